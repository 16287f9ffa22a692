//! Which kinds the provider reads and writes, and where they live in the API.
//!
//! A fixed table covers the kinds a tenant's templates commonly render, so those need no
//! discovery request. Any other kind must be named in `[providers.kubernetes] kinds` (so that
//! plans list it) and is resolved once per run through discovery of its group version
//! (`GET /apis/<group>/<version>`): an unknown kind is a clear error, never a silent skip.

use serde_json::Value;

/// A kind, resolved: where its objects live and whether they are namespaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    /// `v1`, `apps/v1`, `policy/v1`.
    pub api_version: String,
    pub kind: String,
    /// The lower-case plural of the URL (`deployments`).
    pub plural: String,
    pub namespaced: bool,
}

/// What the provider reads and writes unless `kinds` adds more: the built-in templates.
pub const DEFAULT_KINDS: [&str; 4] = ["v1/Namespace", "v1/ResourceQuota", "v1/ConfigMap", "apps/v1/Deployment"];

/// (apiVersion, kind, plural, namespaced)
const WELL_KNOWN: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ResourceQuota", "resourcequotas", true),
    ("v1", "LimitRange", "limitranges", true),
    ("v1", "ConfigMap", "configmaps", true),
    ("v1", "Service", "services", true),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "PersistentVolumeClaim", "persistentvolumeclaims", true),
    ("apps/v1", "Deployment", "deployments", true),
    ("apps/v1", "StatefulSet", "statefulsets", true),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", true),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", true),
    ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", true),
    ("networking.k8s.io/v1", "Ingress", "ingresses", true),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", true),
];

impl Kind {
    pub fn well_known(api_version: &str, kind: &str) -> Option<Kind> {
        WELL_KNOWN.iter().find(|(a, k, _, _)| *a == api_version && *k == kind).map(|(a, k, p, n)| Kind {
            api_version: (*a).to_owned(),
            kind: (*k).to_owned(),
            plural: (*p).to_owned(),
            namespaced: *n,
        })
    }

    /// `(group, version)`; the core group is `""`.
    pub fn group_version(api_version: &str) -> (&str, &str) {
        match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        }
    }

    fn prefix(&self) -> String {
        match Self::group_version(&self.api_version) {
            ("", v) => format!("/api/{v}"),
            (g, v) => format!("/apis/{g}/{v}"),
        }
    }

    /// The collection's URL path: in one namespace, or across all of them (`None`).
    pub fn collection(&self, namespace: Option<&str>) -> String {
        match namespace.filter(|_| self.namespaced) {
            Some(ns) => format!("{}/namespaces/{ns}/{}", self.prefix(), self.plural),
            None => format!("{}/{}", self.prefix(), self.plural),
        }
    }

    /// `apps/v1 Deployment`, for messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.api_version, self.kind)
    }
}

/// The table's apiVersion of a kind name (for suggestions).
pub fn api_version_of(kind: &str) -> Option<&'static str> {
    WELL_KNOWN.iter().find(|(_, k, _, _)| *k == kind).map(|(a, _, _, _)| *a)
}

/// Parses a `kinds` entry: `apiVersion/Kind` (`v1/Service`, `policy/v1/PodDisruptionBudget`).
pub fn parse_entry(entry: &str) -> Option<(String, String)> {
    let (api_version, kind) = entry.rsplit_once('/')?;
    let ok = !api_version.is_empty()
        && api_version.split('/').count() <= 2
        && kind.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphanumeric());
    ok.then(|| (api_version.to_owned(), kind.to_owned()))
}

/// Finds `kind` in a discovery document (`APIResourceList`) of its group version.
pub fn from_discovery(doc: &Value, api_version: &str, kind: &str) -> Option<Kind> {
    doc.get("resources")?.as_array()?.iter().find_map(|r| {
        let name = r.get("name")?.as_str()?;
        (r.get("kind")?.as_str()? == kind && !name.contains('/')).then(|| Kind {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            plural: name.to_owned(),
            namespaced: r.get("namespaced").and_then(Value::as_bool).unwrap_or(true),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        let d = Kind::well_known("apps/v1", "Deployment").unwrap();
        assert_eq!(d.collection(Some("ns")), "/apis/apps/v1/namespaces/ns/deployments");
        assert_eq!(d.collection(None), "/apis/apps/v1/deployments");
        let n = Kind::well_known("v1", "Namespace").unwrap();
        assert_eq!(n.collection(Some("ignored")), "/api/v1/namespaces");
    }

    #[test]
    fn entries_and_discovery() {
        assert_eq!(
            parse_entry("policy/v1/PodDisruptionBudget"),
            Some(("policy/v1".into(), "PodDisruptionBudget".into()))
        );
        assert_eq!(parse_entry("v1/Service"), Some(("v1".into(), "Service".into())));
        assert_eq!(parse_entry("Service"), None);
        assert_eq!(parse_entry("a/b/c/Kind"), None);
        assert_eq!(parse_entry("v1/service"), None);
        let doc = json!({"kind": "APIResourceList", "groupVersion": "policy/v1", "resources": [
            {"name": "poddisruptionbudgets/status", "kind": "PodDisruptionBudget", "namespaced": true},
            {"name": "poddisruptionbudgets", "kind": "PodDisruptionBudget", "namespaced": true}]});
        let k = from_discovery(&doc, "policy/v1", "PodDisruptionBudget").unwrap();
        assert_eq!(k.plural, "poddisruptionbudgets");
        assert!(from_discovery(&doc, "policy/v1", "Eviction").is_none());
    }
}
