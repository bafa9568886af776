//! API types of the moe-operator custom resources.
//!
//! This crate holds only types and pure helpers (defaults, validation, label and
//! condition names); it never talks to a cluster, so the operator, `moectl` and
//! tests share one definition of the API.

/// API group of every moe-operator resource.
pub const GROUP: &str = "moe.dev";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";

/// `group/version`, as written in `apiVersion`.
pub fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_version_joins_group_and_version() {
        assert_eq!(super::api_version(), "moe.dev/v1alpha1");
    }
}
