//! Every CUDA launch in `src/cuda/` pushes as many arguments as its kernel
//! in `kernels/cuda/` declares. cudarc cannot check this (a launch passes
//! untyped pointers to its arguments), the compiler cannot (the kernels are
//! compiled at run time), and without a GPU nothing would run the launch:
//! a kernel that gains a parameter its launcher does not push reads
//! garbage on the device, found only in the next GPU session. This reads
//! the sources, so it runs in the CPU-only build.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Kernel name → parameter count, from `extern "C" __global__ void name(...)`.
fn kernel_parameters(dir: &Path) -> BTreeMap<String, usize> {
    let mut kernels = BTreeMap::new();
    for entry in fs::read_dir(dir).expect("kernels/cuda") {
        let path = entry.expect("a kernel source").path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let source = fs::read_to_string(&path).expect("a readable kernel source");
        for declaration in source.split("extern \"C\" __global__ void ").skip(1) {
            let open = declaration.find('(').expect("a kernel's parameter list");
            let close = declaration
                .find(')')
                .expect("a kernel's parameter list ends");
            let name = declaration[..open].trim().to_string();
            let list = declaration[open + 1..close].trim();
            let count = if list.is_empty() {
                0
            } else {
                list.split(',').count()
            };
            assert!(
                kernels.insert(name.clone(), count).is_none(),
                "{name} is declared twice"
            );
        }
    }
    kernels
}

/// One launch in a launcher: the kernel (when named by a string literal),
/// how many `.arg(` it pushes, and whether some are pushed conditionally.
struct Launch {
    file: String,
    kernel: Option<String>,
    args: usize,
    conditional: bool,
}

/// Launches in `source`: each `launch_builder(&f)` up to the next
/// `.launch(`, its kernel named in the nearest `let f = ...;` before it.
fn launches(file: &str, source: &str) -> Vec<Launch> {
    let mut found = Vec::new();
    let mut rest = source;
    let mut offset = 0;
    while let Some(at) = rest.find("launch_builder(&") {
        let start = offset + at;
        let var_start = start + "launch_builder(&".len();
        let var_end = var_start + source[var_start..].find(')').expect("launch_builder(&f)");
        let var = &source[var_start..var_end];
        let end = var_end + source[var_end..].find(".launch(").expect("a launch");
        let block = &source[var_end..end];
        let binding = [format!("let {var} = "), format!("let mut {var} = ")]
            .iter()
            .filter_map(|pattern| source[..start].rfind(pattern.as_str()))
            .max();
        // The kernel is the first string literal of that statement
        // (`gpu.function(&FAMILY, "name")` or a helper given the name).
        let kernel = binding.and_then(|i| {
            let statement = &source[i..i + source[i..].find(';').expect("a statement")];
            let mut literals = statement.split('"');
            literals.next();
            literals.next().map(str::to_string)
        });
        found.push(Launch {
            file: file.to_string(),
            kernel,
            args: block.matches(".arg(").count(),
            conditional: block.contains("if "),
        });
        offset = end;
        rest = &source[end..];
    }
    found
}

#[test]
fn every_launch_pushes_its_kernels_parameters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = kernel_parameters(&root.join("../kernels/cuda"));
    let mut checked = 0;
    let mut mismatches = Vec::new();
    let mut launchers: Vec<_> = fs::read_dir(root.join("src/cuda"))
        .expect("src/cuda")
        .map(|e| e.expect("a launcher").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    launchers.sort();
    for path in launchers {
        let source = fs::read_to_string(&path).expect("a readable launcher");
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        for launch in launches(&file, &source) {
            // A kernel chosen at run time, or arguments pushed under a
            // condition, cannot be counted from the text.
            let (Some(kernel), false) = (&launch.kernel, launch.conditional) else {
                continue;
            };
            let Some(&expected) = kernels.get(kernel) else {
                mismatches.push(format!(
                    "{}: {kernel} is no kernel in kernels/cuda",
                    launch.file
                ));
                continue;
            };
            checked += 1;
            if launch.args != expected {
                mismatches.push(format!(
                    "{}: {kernel} declares {expected} parameters, the launch pushes {}",
                    launch.file, launch.args
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // The launchers name most kernels by literal: a parser that found
    // nothing would pass vacuously.
    assert!(checked >= 40, "only {checked} launches checked");
}

#[test]
fn the_launch_parser_counts_arguments_and_finds_the_kernel() {
    let source = r#"
        let f = gpu.function(&VECTOR, "first")?;
        let mut launch = gpu.stream().launch_builder(&f);
        launch.arg(a).arg(&b);
        unsafe { launch.launch(cfg) }?;
        let f = gpu.function(&VECTOR, entry)?;
        let mut launch = gpu.stream().launch_builder(&f);
        launch.arg(a);
        if x { launch.arg(b); }
        unsafe { launch.launch(cfg) }?;
        let g = tiled_kernel(gpu, "second", bytes)?;
        let mut launch = gpu.stream().launch_builder(&g);
        launch.arg(a).arg(b).arg(c);
        unsafe { launch.launch(cfg) }?;
    "#;
    let found = launches("x.rs", source);
    let summary: Vec<_> = found
        .iter()
        .map(|l| (l.kernel.as_deref(), l.args, l.conditional))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("first"), 2, false),
            (None, 2, true),
            (Some("second"), 3, false)
        ]
    );
}
