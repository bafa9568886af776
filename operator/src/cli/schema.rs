//! The structural checks the apiserver makes against a CRD's openAPIV3
//! schema before any CEL rule runs: unknown fields (strict field
//! validation), types, `required`, `enum`, `minimum`/`maximum`, string
//! lengths and patterns, and item counts. Kept apart from the CEL rules because the CEL
//! evaluator assumes a value that already passed them, and these bounds
//! (e.g. `parallelism.nodes >= 1`) are written only in the schema.
//!
//! Messages follow the apiserver's wording (`<path>: Unsupported value: ...`)
//! so that `moectl validate` and a real apply read alike.

use serde_json::{Map, Number, Value};

/// Every structural problem of `object`, a whole custom resource, against
/// the CRD version's `openAPIV3Schema`, each naming its field path, in path
/// order. `apiVersion`, `kind` and `metadata` are not in a CRD's schema (the
/// apiserver checks them for every kind); see [`problems_at`] for metadata.
pub fn problems(schema: &Value, object: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match object.as_object() {
        Some(map) => check_object(
            schema,
            map,
            "",
            &["apiVersion", "kind", "metadata"],
            &mut out,
        ),
        None => out.push("the document is not a mapping".into()),
    }
    out.sort();
    out
}

/// Every structural problem of `value`, found at `path`, against `schema`.
pub fn problems_at(schema: &Value, value: &Value, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    check(schema, value, path, &mut out);
    out.sort();
    out
}

fn check(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() && flag(schema, "nullable") {
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(is_integer(value) || value.is_string()) {
            out.push(format!(
                "{path}: Invalid value: {value}: must be an integer or a string"
            ));
        }
        return;
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str)
        && !has_type(value, ty)
    {
        out.push(format!(
            "{path}: Invalid value: {value}: must be of type {ty}"
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let supported = allowed
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        out.push(format!(
            "{path}: Unsupported value: {value}: supported values: {supported}"
        ));
    }
    match value {
        Value::Number(n) => check_number(schema, n, path, out),
        Value::String(s) => check_string(schema, s, path, out),
        Value::Array(items) => {
            check_count(schema, items.len(), path, out);
            check_list_type(schema, items, path, out);
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::Object(map) => check_object(schema, map, path, &[], out),
        Value::Null | Value::Bool(_) => {}
    }
}

fn check_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    implicit: &[&str],
    out: &mut Vec<String>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !map.contains_key(name) {
            out.push(format!("{}: Required value", join(path, name)));
        }
    }
    let additional = schema.get("additionalProperties");
    // An object schema that lists no properties is an opaque blob (such as
    // `managedFields[].fieldsV1`): its fields are not the schema's to know.
    let keeps_unknown = flag(schema, "x-kubernetes-preserve-unknown-fields")
        || additional == Some(&Value::Bool(true))
        || (properties.is_none() && additional.is_none());
    for (key, value) in map {
        if implicit.contains(&key.as_str()) {
            continue;
        }
        if let Some(field_schema) = properties.and_then(|p| p.get(key)) {
            check(field_schema, value, &join(path, key), out);
        } else if let Some(value_schema) = additional.filter(|a| a.is_object()) {
            check(value_schema, value, &format!("{path}[{key}]"), out);
        } else if !keeps_unknown {
            out.push(unknown_field(&join(path, key), key, properties));
        }
    }
}

fn unknown_field(path: &str, key: &str, known: Option<&Map<String, Value>>) -> String {
    match known.and_then(|k| closest(key, k.keys().map(String::as_str))) {
        Some(suggestion) => format!("{path}: unknown field (did you mean {suggestion}?)"),
        None => format!("{path}: unknown field"),
    }
}

/// The known field a misspelt `key` most likely meant: one differing only in
/// case, else the nearest within two edits.
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str> + Clone) -> Option<&'a str> {
    if let Some(same) = known.clone().find(|k| k.eq_ignore_ascii_case(key)) {
        return Some(same);
    }
    known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

fn check_number(schema: &Value, n: &Number, path: &str, out: &mut Vec<String>) {
    let Some(x) = n.as_f64() else { return };
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        if flag(schema, "exclusiveMinimum") && x <= min {
            out.push(format!(
                "{path}: Invalid value: {n}: should be greater than {min}"
            ));
        } else if x < min {
            out.push(format!(
                "{path}: Invalid value: {n}: should be greater than or equal to {min}"
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        if flag(schema, "exclusiveMaximum") && x >= max {
            out.push(format!(
                "{path}: Invalid value: {n}: should be less than {max}"
            ));
        } else if x > max {
            out.push(format!(
                "{path}: Invalid value: {n}: should be less than or equal to {max}"
            ));
        }
    }
    // The apiserver accepts any int64 here, but the operator reads it as an
    // i32 and would fail later, far from the field.
    if schema.get("format").and_then(Value::as_str) == Some("int32")
        && n.as_i64().is_none_or(|i| i32::try_from(i).is_err())
    {
        out.push(format!("{path}: Invalid value: {n}: must fit in 32 bits"));
    }
}

fn check_string(schema: &Value, s: &str, path: &str, out: &mut Vec<String>) {
    let chars = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        out.push(format!(
            "{path}: Invalid value: {s:?}: should be at least {min} chars long"
        ));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        out.push(format!("{path}: Too long: may not be longer than {max}"));
    }
    // The apiserver's own wording for a string off its pattern.
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
        && regex::Regex::new(pattern).is_ok_and(|re| !re.is_match(s))
    {
        out.push(format!(
            "{path}: Invalid value: {s:?}: {path} in body should match '{pattern}'"
        ));
    }
}

/// A list map (`x-kubernetes-list-type: map`): no two items with the same
/// keys; a set (`set`): no two items alike.
fn check_list_type(schema: &Value, items: &[Value], path: &str, out: &mut Vec<String>) {
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {}
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    out.push(format!("{path}[{i}]: Duplicate value: {item}"));
                }
            }
            return;
        }
        _ => return,
    }
    let keys: Vec<&str> = schema
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let key_of = |item: &Value| -> Map<String, Value> {
        keys.iter()
            .filter_map(|k| Some((k.to_string(), item.get(*k)?.clone())))
            .collect()
    };
    for (i, item) in items.iter().enumerate() {
        let key = key_of(item);
        if items[..i].iter().any(|earlier| key_of(earlier) == key) {
            out.push(format!(
                "{path}[{i}]: Duplicate value: {}",
                Value::Object(key)
            ));
        }
    }
}

fn check_count(schema: &Value, len: usize, path: &str, out: &mut Vec<String>) {
    let len = len as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && len < min
    {
        out.push(format!(
            "{path}: Required value: must have at least {min} items"
        ));
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && len > max
    {
        out.push(format!(
            "{path}: Too many: {len}: must have at most {max} items"
        ));
    }
}

fn has_type(value: &Value, ty: &str) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => is_integer(value),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        // A type this walker does not know: leave it to the apiserver.
        _ => true,
    }
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64()
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {
                        "nodes": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 8},
                        "router": {"type": "string", "enum": ["softmax", "sigmoid"]},
                        "queue": {"type": "string", "minLength": 1, "maxLength": 3, "nullable": true},
                        "key": {"type": "string", "pattern": "^[a-z]+(/[a-z]+)?$"},
                        "rules": {"type": "array", "maxItems": 1, "items": {
                            "type": "object", "properties": {"code": {"type": "integer"}}
                        }},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "quantity": {"x-kubernetes-int-or-string": true}
                    }
                }
            }
        })
    }

    #[test]
    fn a_conforming_object_has_no_problems() {
        let object = json!({
            "apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"},
            "spec": {"nodes": 2, "router": "softmax", "queue": null, "rules": [{"code": 3}], "key": "a/b",
                     "labels": {"a": "b"}, "quantity": "8Gi"}
        });
        assert_eq!(problems(&schema(), &object), Vec::<String>::new());
    }

    #[test]
    fn reports_each_violation_with_its_path() {
        let object = json!({"spec": {
            "nodes": 0, "router": "relu", "queue": "long", "rules": [{"code": "x"}, {}], "key": "A b",
            "labels": {"a": 1}, "quantity": 1.5
        }});
        assert_eq!(
            problems(&schema(), &object),
            vec![
                "spec.key: Invalid value: \"A b\": spec.key in body should match '^[a-z]+(/[a-z]+)?$'",
                "spec.labels[a]: Invalid value: 1: must be of type string",
                "spec.nodes: Invalid value: 0: should be greater than or equal to 1",
                "spec.quantity: Invalid value: 1.5: must be an integer or a string",
                "spec.queue: Too long: may not be longer than 3",
                "spec.router: Unsupported value: \"relu\": supported values: \"softmax\", \"sigmoid\"",
                "spec.rules: Too many: 2: must have at most 1 items",
                "spec.rules[0].code: Invalid value: \"x\": must be of type integer",
            ]
        );
    }

    #[test]
    fn a_list_map_refuses_two_items_with_one_key() {
        let schema = json!({"type": "object", "properties": {"claims": {
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "items": {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}}}
        }}});
        let ok = json!({"claims": [{"name": "a", "size": 1}, {"name": "b", "size": 1}]});
        assert!(problems(&schema, &ok).is_empty());
        let twice = json!({"claims": [{"name": "a", "size": 1}, {"name": "a", "size": 2}]});
        assert_eq!(
            problems(&schema, &twice),
            [r#"claims[1]: Duplicate value: {"name":"a"}"#]
        );
    }

    #[test]
    fn a_list_set_refuses_an_item_twice() {
        let schema = json!({"type": "object", "properties": {"targets": {
            "type": "array",
            "x-kubernetes-list-type": "set",
            "items": {"type": "string"}
        }}});
        assert!(problems(&schema, &json!({"targets": ["a", "b"]})).is_empty());
        assert_eq!(
            problems(&schema, &json!({"targets": ["a", "b", "a"]})),
            [r#"targets[2]: Duplicate value: "a""#]
        );
    }

    #[test]
    fn leaves_opaque_objects_alone() {
        let opaque = json!({"type": "object"});
        assert!(problems_at(&opaque, &json!({"f:spec": {}}), "fieldsV1").is_empty());
    }

    #[test]
    fn reports_missing_required_fields_and_int32_overflow() {
        assert_eq!(
            problems(&schema(), &json!({})),
            vec!["spec: Required value"]
        );
        let big = json!({"spec": {"nodes": 5_000_000_000_i64}});
        assert!(
            problems(&schema(), &big)
                .iter()
                .any(|p| p.ends_with("must fit in 32 bits"))
        );
    }

    #[test]
    fn names_an_unknown_field_and_suggests_the_known_one() {
        let object = json!({"spec": {"Nodes": 1, "ruoter": "x", "zzz": 1}});
        assert_eq!(
            problems(&schema(), &object),
            vec![
                "spec.Nodes: unknown field (did you mean nodes?)",
                "spec.ruoter: unknown field (did you mean router?)",
                "spec.zzz: unknown field",
            ]
        );
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("topk", "topK"), 1);
        assert_eq!(edit_distance("expert", "experts"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
