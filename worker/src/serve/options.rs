//! The server's options, from the operator's `ServingConfig` (the file its
//! pods pass with `--config`) and command-line flags, flags winning. Pure:
//! `main` reads the file and the environment.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use moe_crds::contract::{METRICS_PORT, SERVING_PORT};
use moe_crds::{Device, ModelFormat, ServingConfig, ServingPrecision};

use crate::ops::packed_linear::WeightPrecision;

use crate::serve::adapters::AdapterSource;
use crate::serve::{DEFAULT_KV_CACHE_BYTES, DEFAULT_PAGE_SIZE, ServeError, ServeOptions};

/// The operator's defaults (`spec.serving`), for a server started by hand.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 8192;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 64;
/// How often an expert-parallel replica with redundant experts chooses
/// them again (the CRD's default `intervalSeconds`).
pub const DEFAULT_REBALANCE_INTERVAL_SECONDS: usize = 600;
/// Waiting requests per running slot before 429s: enough to ride out a
/// burst, few enough that a queued request is not answered minutes late.
pub const QUEUE_PER_RUNNING_SLOT: usize = 4;

/// What the command line set; `None` leaves the config's value or the default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flags {
    pub model: Option<PathBuf>,
    pub format: Option<ModelFormat>,
    pub checkpoint_step: Option<u64>,
    pub served_model_name: Option<String>,
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub max_batch_tokens: Option<usize>,
    pub max_concurrent_requests: Option<usize>,
    pub max_queued_requests: Option<usize>,
    pub kv_cache_mib: Option<usize>,
    pub threads: Option<usize>,
    pub precision: Option<ServingPrecision>,
    /// Ranks of one replica, the experts split over them (`parallelism`'s
    /// `expertParallel` in the config).
    pub expert_parallel: Option<usize>,
    /// Expert copies per MoE layer over the replica (`parallelism.
    /// expertLoadBalancing.redundantExperts` in the config).
    pub redundant_experts: Option<usize>,
    /// Seconds between choices of the copies (`intervalSeconds`).
    pub rebalance_interval_seconds: Option<u64>,
    /// `MOE_STATUS_ADDR`: `host:port`, or `off`.
    pub metrics_addr: Option<String>,
    /// `--no-prefix-caching`: turns the config's prefix caching off.
    pub no_prefix_caching: bool,
    /// Where the model computes (`device` in the config).
    pub device: Option<Device>,
    /// `--lora NAME=DIR`, each an adapter served beside the model.
    pub lora: Vec<String>,
}

/// Merges `config` (if any) and `flags`; the returned warnings are for the log.
pub fn resolve(
    config: Option<&ServingConfig>,
    flags: Flags,
) -> Result<(ServeOptions, Vec<String>), ServeError> {
    let mut warnings = Vec::new();
    if let Some(config) = config {
        check_supported(config)?;
    }
    let model_dir = flags
        .model
        .or_else(|| config.map(|c| PathBuf::from(&c.model_dir)))
        .ok_or_else(|| {
            ServeError::Options("no model: pass --model <dir> or --config <file>".into())
        })?;
    let from_config = |f: fn(&ServingConfig) -> i64| config.map(f);
    let count = |flag: Option<usize>, configured: Option<i64>, default: usize, what: &str| match (
        flag, configured,
    ) {
        (Some(v), _) => Ok(v),
        (None, Some(v)) => usize::try_from(v)
            .map_err(|_| ServeError::Options(format!("{what} is {v}, which is negative"))),
        (None, None) => Ok(default),
    };
    let max_batch_tokens = count(
        flags.max_batch_tokens,
        from_config(|c| i64::from(c.max_batch_tokens)),
        DEFAULT_MAX_BATCH_TOKENS,
        "maxBatchTokens",
    )?;
    let max_concurrent_requests = count(
        flags.max_concurrent_requests,
        from_config(|c| i64::from(c.max_concurrent_requests)),
        DEFAULT_MAX_CONCURRENT_REQUESTS,
        "maxConcurrentRequests",
    )?;
    // A training job's checkpoint: the step the operator resolved, which it
    // also sets as `checkpointStep`; `trained.step` covers a config without.
    let configured_step = config.and_then(|c| {
        c.checkpoint_step
            .or_else(|| c.trained.as_ref().map(|t| t.step))
    });
    let checkpoint_step = match (flags.checkpoint_step, configured_step) {
        (Some(step), _) => Some(step),
        (None, Some(step)) => Some(u64::try_from(step).map_err(|_| {
            ServeError::Options(format!("checkpointStep is {step}, which is negative"))
        })?),
        (None, None) => None,
    };
    let port = flags
        .port
        .or_else(|| config.map(|c| c.port))
        .unwrap_or(SERVING_PORT);
    let host = flags.host.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let metrics_listen = match flags.metrics_addr.as_deref() {
        Some("off") => None,
        Some(addr) => Some(addr.parse().map_err(|e| {
            ServeError::Options(format!("metrics address {addr:?} is not host:port: {e}"))
        })?),
        None => Some(SocketAddr::new(host, METRICS_PORT)),
    };
    let balancing = config.and_then(|c| c.parallelism.expert_load_balancing.as_ref());
    let device = flags
        .device
        .or_else(|| config.map(|c| c.device))
        .unwrap_or(Device::Cpu);
    let options = ServeOptions {
        model_dir,
        format: flags.format.or_else(|| config.map(|c| c.format)),
        checkpoint_step,
        model_name: flags.served_model_name.or_else(|| {
            // The service's name, as its clients know it (`namespace/name`).
            config.and_then(|c| c.service.rsplit('/').next().map(str::to_owned))
        }),
        listen: SocketAddr::new(host, port),
        metrics_listen,
        max_batch_tokens,
        max_concurrent_requests,
        max_queued_requests: flags
            .max_queued_requests
            .unwrap_or(QUEUE_PER_RUNNING_SLOT * max_concurrent_requests),
        kv_cache_bytes: flags
            .kv_cache_mib
            .map_or(DEFAULT_KV_CACHE_BYTES, |mib| mib.saturating_mul(1 << 20)),
        page_size: DEFAULT_PAGE_SIZE,
        threads: flags.threads.unwrap_or(1),
        weights: weights(
            flags
                .precision
                .or_else(|| config.map(|c| c.precision))
                .unwrap_or(ServingPrecision::Fp32),
        ),
        expected_model: config.and_then(|c| c.model.clone()),
        expert_parallel: count(
            flags.expert_parallel,
            from_config(|c| i64::from(c.parallelism.expert_parallel)),
            1,
            "parallelism.expertParallel",
        )?,
        redundant_experts: count(
            flags.redundant_experts,
            balancing.map(|b| i64::from(b.redundant_experts)),
            0,
            "parallelism.expertLoadBalancing.redundantExperts",
        )?,
        rebalance_interval: Duration::from_secs(count(
            flags.rebalance_interval_seconds.map(|s| s as usize),
            balancing.map(|b| i64::from(b.interval_seconds)),
            DEFAULT_REBALANCE_INTERVAL_SECONDS,
            "parallelism.expertLoadBalancing.intervalSeconds",
        )? as u64),
        prefix_caching: !flags.no_prefix_caching && config.is_none_or(|c| c.prefix_caching),
        device,
        // The service's adapters, then those of the command line.
        adapters: config
            .iter()
            .flat_map(|c| &c.adapters)
            .map(|a| {
                Ok(AdapterSource {
                    name: a.name.clone(),
                    dir: PathBuf::from(&a.dir),
                })
            })
            .chain(flags.lora.iter().map(|text| AdapterSource::parse(text)))
            .collect::<Result<_, _>>()
            .map_err(ServeError::Options)?,
    };
    device_warnings(&options, &mut warnings);
    Ok((options, warnings))
}

/// The weights a precision is served with on the CPU: activations and sums
/// are f32 in every case.
fn weights(precision: ServingPrecision) -> WeightPrecision {
    match precision {
        ServingPrecision::Fp32 => WeightPrecision::F32,
        ServingPrecision::Bf16 => WeightPrecision::Bf16,
        ServingPrecision::Fp8 => WeightPrecision::Fp8,
    }
}

/// Refuses what this server cannot do at all.
fn check_supported(config: &ServingConfig) -> Result<(), ServeError> {
    let p = &config.parallelism;
    let ranks = p.ranks_per_replica();
    if ranks != p.expert_parallel {
        return Err(ServeError::Options(format!(
            "parallelism.expertParallel is {} but a replica has {ranks} ranks (podsPerReplica {} ×              processesPerPod {}): serving splits the experts over every rank of a replica, so              expertParallel must equal podsPerReplica × processesPerPod (other parallelism within              a replica is not implemented)",
            p.expert_parallel, p.pods_per_replica, p.processes_per_pod
        )));
    }
    Ok(())
}

/// What `device: cuda` cannot honour, warned before anything loads (the
/// GPU engine's own fallbacks, a model it does not run, are logged when the
/// model is placed).
fn device_warnings(options: &ServeOptions, warnings: &mut Vec<String>) {
    if options.device != Device::Cuda {
        return;
    }
    // One process or each rank of an expert-parallel replica alike: a CUDA
    // build decides when the model (or the rank's share) is placed.
    if !cfg!(feature = "cuda") {
        warnings.push(
            "device cuda: this worker was built without the `cuda` feature; serving on the CPU"
                .into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_crds::ServingParallelism;

    fn config() -> ServingConfig {
        ServingConfig {
            service: "serve/chat".into(),
            model_dir: "/models/run".into(),
            format: ModelFormat::Native,
            checkpoint_step: Some(300),
            model: None,
            trained: None,
            parallelism: ServingParallelism::default(),
            port: 8001,
            max_batch_tokens: 512,
            max_concurrent_requests: 8,
            precision: ServingPrecision::Fp32,
            device: Device::Cpu,
            prefix_caching: true,
            adapters: vec![moe_crds::ServingAdapter {
                name: "chat-sql".into(),
                dir: "/adapters/0/exports/serve/tune/adapter".into(),
                revision: "moetrainingjob/tune/0a1b2c3d".into(),
            }],
        }
    }

    #[test]
    fn adapters_come_from_the_config_then_the_command_line() {
        let flags = Flags {
            lora: vec!["chat-math=/tmp/math".into()],
            ..Flags::default()
        };
        let (o, _) = resolve(Some(&config()), flags).unwrap();
        assert_eq!(
            o.adapters,
            [
                AdapterSource {
                    name: "chat-sql".into(),
                    dir: "/adapters/0/exports/serve/tune/adapter".into(),
                },
                AdapterSource {
                    name: "chat-math".into(),
                    dir: "/tmp/math".into(),
                },
            ]
        );
        for (lora, says) in [("/tmp/math", "NAME=DIR"), ("a,b=/tmp/x", "a comma")] {
            let flags = Flags {
                model: Some("m".into()),
                lora: vec![lora.into()],
                ..Flags::default()
            };
            let e = resolve(None, flags).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn the_config_file_sets_what_flags_leave() {
        let (o, warnings) = resolve(Some(&config()), Flags::default()).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(o.model_dir, PathBuf::from("/models/run"));
        assert_eq!(
            (
                o.listen.port(),
                o.max_batch_tokens,
                o.max_concurrent_requests
            ),
            (8001, 512, 8)
        );
        assert_eq!(o.max_queued_requests, 32);
        assert_eq!(o.checkpoint_step, Some(300));
        assert_eq!(o.served_name(), "chat");
        assert_eq!(o.metrics_listen.map(|a| a.port()), Some(METRICS_PORT));
    }

    #[test]
    fn flags_win_and_work_alone() {
        let flags = Flags {
            model: Some("runs/tiny".into()),
            port: Some(9000),
            max_batch_tokens: Some(64),
            metrics_addr: Some("off".into()),
            ..Flags::default()
        };
        let (o, _) = resolve(Some(&config()), flags.clone()).unwrap();
        assert_eq!(
            (o.model_dir.to_str(), o.listen.port(), o.max_batch_tokens),
            (Some("runs/tiny"), 9000, 64)
        );
        assert_eq!(o.metrics_listen, None);
        let (o, _) = resolve(None, flags).unwrap();
        assert_eq!(o.max_concurrent_requests, DEFAULT_MAX_CONCURRENT_REQUESTS);
        assert!(
            resolve(None, Flags::default()).is_err(),
            "no model anywhere"
        );
    }

    #[test]
    fn expert_parallel_replicas_are_accepted_other_layouts_refused() {
        let mut c = config();
        c.parallelism.expert_parallel = 2;
        c.parallelism.processes_per_pod = 2;
        let (o, _) = resolve(Some(&c), Flags::default()).unwrap();
        assert_eq!(o.expert_parallel, 2);
        c.parallelism.pods_per_replica = 2;
        c.parallelism.expert_parallel = 4;
        assert_eq!(
            resolve(Some(&c), Flags::default())
                .unwrap()
                .0
                .expert_parallel,
            4
        );
        // Ranks beyond the expert split (data or tensor parallel within a
        // replica) are not built: refused naming the field.
        c.parallelism.expert_parallel = 2;
        let message = resolve(Some(&c), Flags::default()).unwrap_err().to_string();
        assert!(
            message.contains("parallelism.expertParallel is 2 but a replica has 4 ranks"),
            "{message}"
        );
        let mut c = config();
        c.parallelism.processes_per_pod = 2;
        assert!(
            resolve(Some(&c), Flags::default()).is_err(),
            "EP 1 over 2 ranks"
        );
        // Without a config the flag alone sets it.
        let flags = Flags {
            model: Some("runs/tiny".into()),
            expert_parallel: Some(4),
            ..Flags::default()
        };
        assert_eq!(resolve(None, flags).unwrap().0.expert_parallel, 4);
        assert_eq!(
            resolve(
                None,
                Flags {
                    model: Some("m".into()),
                    ..Flags::default()
                }
            )
            .unwrap()
            .0
            .expert_parallel,
            1
        );
    }

    #[test]
    fn gpu_settings_are_warned() {
        let mut c = config();
        c.device = Device::Cuda;
        // The GPU engine keeps f32 weights: that is logged when it loads.
        c.precision = ServingPrecision::Fp8;
        let (o, warnings) = resolve(Some(&c), Flags::default()).unwrap();
        assert_eq!(o.device, Device::Cuda);
        // One process: a build without CUDA says it serves on the CPU; a
        // CUDA build decides when the model is placed.
        let expected = usize::from(!cfg!(feature = "cuda"));
        assert_eq!(warnings.len(), expected, "{warnings:?}");
        c.parallelism.expert_parallel = 2;
        c.parallelism.processes_per_pod = 2;
        // An expert-parallel replica: the same (each rank's share is placed
        // on its GPU by a CUDA build).
        let (_, warnings) = resolve(Some(&c), Flags::default()).unwrap();
        assert_eq!(warnings.len(), expected, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .all(|w| w.contains("built without the `cuda` feature")),
            "{warnings:?}"
        );
        // The flag wins over the config.
        let flags = Flags {
            device: Some(Device::Cpu),
            ..Flags::default()
        };
        let (o, warnings) = resolve(Some(&c), flags).unwrap();
        assert_eq!(o.device, Device::Cpu);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_training_jobs_checkpoint_is_served_at_its_step_and_shape() {
        let mut c = config();
        c.checkpoint_step = None;
        c.model = Some(
            serde_json::from_value(serde_json::json!({
                "vocabSize": 256, "hiddenSize": 32, "layers": 2, "attentionHeads": 4,
                "kvHeads": 2, "seqLen": 64,
                "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 24},
            }))
            .unwrap(),
        );
        c.trained = Some(moe_crds::TrainedWith {
            job: "ml/pretrain".into(),
            uid: "0f1e".into(),
            step: 200,
            tokenizer: moe_crds::Tokenizer::Byte,
            precision: Default::default(),
        });
        let (o, _) = resolve(Some(&c), Flags::default()).unwrap();
        assert_eq!(o.checkpoint_step, Some(200));
        assert_eq!(o.expected_model, c.model);
    }

    #[test]
    fn precision_picks_the_weights_flag_over_config_fp32_by_hand() {
        let weights = |config: Option<&ServingConfig>, flag| {
            let flags = Flags {
                model: Some("runs/tiny".into()),
                precision: flag,
                ..Flags::default()
            };
            let (o, warnings) = resolve(config, flags).unwrap();
            (o.weights, warnings.len())
        };
        let mut c = config();
        c.precision = ServingPrecision::Bf16;
        assert_eq!(weights(Some(&c), None), (WeightPrecision::Bf16, 0));
        assert_eq!(
            weights(Some(&c), Some(ServingPrecision::Fp32)),
            (WeightPrecision::F32, 0)
        );
        assert_eq!(weights(None, None), (WeightPrecision::F32, 0));
        assert_eq!(
            weights(None, Some(ServingPrecision::Fp8)),
            (WeightPrecision::Fp8, 0)
        );
    }
}
