//! Drift projection: a live object seen through the fields our field manager owns.
//!
//! Server-side apply records, in `metadata.managedFields`, which fields each manager set
//! (`fieldsV1`: `f:<field>` for a field, `k:{...}` for an item of a list keyed by some of its
//! fields, `v:<value>` for an item of a set, `.` for "this item itself"). The projection
//! keeps only the fields in our manager's `Apply` entries, plus the object's identity
//! (`apiVersion`, `kind`, `metadata.name`, `metadata.namespace`), which the server leaves out
//! of field sets. What the server adds (uid, resourceVersion, timestamps, status, defaulted
//! fields) and what other managers own (controllers' annotations, a label someone added) is
//! not ours, so it never shows as drift; a field we set that someone else changed since has
//! moved to their manager and so is missing from ours: that is drift, and applying again
//! (with `force`) takes it back. When live equals what we applied, the projection equals the
//! rendered manifest, so desired, live and recorded fingerprints agree.

use serde_json::{Map, Value};

/// The union of the field sets our manager holds through `Apply` operations on the object
/// itself (not on subresources). `None`: the manager has no fields on the object.
pub fn managed_fields(obj: &Value, manager: &str) -> Option<Map<String, Value>> {
    let entries = obj.pointer("/metadata/managedFields")?.as_array()?;
    let mut set: Option<Map<String, Value>> = None;
    for e in entries {
        let ours = e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Apply")
            && e.get("subresource").and_then(Value::as_str).is_none_or(str::is_empty);
        if !ours {
            continue;
        }
        let fields = e.get("fieldsV1").and_then(Value::as_object).cloned().unwrap_or_default();
        match &mut set {
            None => set = Some(fields),
            Some(s) => union(s, &fields),
        }
    }
    set
}

fn union(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v.as_object()) {
            (Some(Value::Object(a)), Some(b)) => union(a, b),
            (None, _) => {
                into.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

/// The object as our manager last applied it: identity plus the fields we own. `None` when
/// our manager owns nothing on it (another manager's object that merely carries our labels).
/// `api_version` and `kind` are those of the resolved kind (list items carry neither).
pub fn project(obj: &Value, manager: &str, api_version: &str, kind: &str) -> Option<Value> {
    let set = managed_fields(obj, manager)?;
    let mut out = match project_node(obj, &set) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    out.insert("apiVersion".into(), Value::String(api_version.to_owned()));
    out.insert("kind".into(), Value::String(kind.to_owned()));
    let meta = out.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        for key in ["name", "namespace"] {
            if let Some(v) =
                obj.pointer(&format!("/metadata/{key}")).filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
            {
                meta.insert(key.into(), v.clone());
            }
        }
    }
    Some(Value::Object(out))
}

/// `live` restricted to `fields`. An empty set is a leaf: the whole value (a scalar, or an
/// atomic list or map) is owned.
fn project_node(live: &Value, fields: &Map<String, Value>) -> Value {
    if fields.is_empty() || fields.keys().all(|k| k == ".") {
        return live.clone();
    }
    match live {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, sub) in fields {
                let Some(name) = k.strip_prefix("f:") else { continue };
                if let Some(v) = m.get(name) {
                    out.insert(name.to_owned(), project_node(v, sub.as_object().unwrap_or(&Map::new())));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let matched = fields.iter().find(|(k, _)| item_matches(k, item, i));
                if let Some((k, sub)) = matched {
                    if k.starts_with("v:") {
                        out.push(item.clone());
                    } else {
                        out.push(project_node(item, sub.as_object().unwrap_or(&Map::new())));
                    }
                }
            }
            Value::Array(out)
        }
        other => other.clone(),
    }
}

/// Whether a list item is the one a `fieldsV1` key names.
fn item_matches(key: &str, item: &Value, index: usize) -> bool {
    if let Some(k) = key.strip_prefix("k:") {
        let Ok(Value::Object(want)) = serde_json::from_str::<Value>(k) else { return false };
        return want.iter().all(|(f, v)| item.get(f) == Some(v));
    }
    if let Some(v) = key.strip_prefix("v:") {
        return serde_json::from_str::<Value>(v).is_ok_and(|v| &v == item);
    }
    if let Some(i) = key.strip_prefix("i:") {
        return i.parse::<usize>() == Ok(index);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "web", "namespace": "ns", "uid": "u-1", "resourceVersion": "42", "generation": 3,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app.kubernetes.io/managed-by": "dotmac-gitops", "team": "added-by-hand"},
                "annotations": {"deployment.kubernetes.io/revision": "3"},
                "managedFields": [
                    {"manager": "dotmac-gitops", "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:metadata": {"f:labels": {"f:app.kubernetes.io/managed-by": {}}},
                        "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                            "k:{\"name\":\"app\"}": {".": {}, "f:name": {}, "f:image": {}, "f:args": {}}}}}}}},
                    {"manager": "kubectl-label", "operation": "Update", "fieldsV1": {"f:metadata": {"f:labels": {"f:team": {}}}}},
                    {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
                     "fieldsV1": {"f:status": {"f:replicas": {}}}},
                    {"manager": "dotmac-gitops", "operation": "Apply", "subresource": "status", "fieldsV1": {"f:status": {}}}
                ]
            },
            "spec": {
                "replicas": 2, "revisionHistoryLimit": 10,
                "template": {"spec": {"restartPolicy": "Always", "containers": [
                    {"name": "sidecar", "image": "injected:1"},
                    {"name": "app", "image": "app:1", "args": ["a", "b"], "imagePullPolicy": "IfNotPresent"}
                ]}}
            },
            "status": {"replicas": 2}
        })
    }

    #[test]
    fn keeps_identity_and_our_fields_only() {
        let p = project(&deployment(), "dotmac-gitops", "apps/v1", "Deployment").unwrap();
        assert_eq!(
            p,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "ns", "labels": {"app.kubernetes.io/managed-by": "dotmac-gitops"}},
                "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "app", "image": "app:1", "args": ["a", "b"]}]}}}
            })
        );
    }

    #[test]
    fn another_managers_object_is_not_ours() {
        assert!(project(&deployment(), "someone-else", "apps/v1", "Deployment").is_none());
        let mut d = deployment();
        d["metadata"]["managedFields"].as_array_mut().unwrap().remove(0);
        assert!(project(&d, "dotmac-gitops", "apps/v1", "Deployment").is_none(), "a status-only entry is not ours");
    }

    #[test]
    fn a_field_taken_over_by_someone_else_goes_missing() {
        let mut d = deployment();
        d["spec"]["replicas"] = json!(5);
        d["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"].as_object_mut().unwrap().remove("f:replicas");
        let p = project(&d, "dotmac-gitops", "apps/v1", "Deployment").unwrap();
        assert!(p.pointer("/spec/replicas").is_none());
    }

    #[test]
    fn set_items_and_union_of_entries() {
        let obj = json!({
            "metadata": {"name": "n", "finalizers": ["a", "b"], "managedFields": [
                {"manager": "m", "operation": "Apply", "fieldsV1": {"f:metadata": {"f:finalizers": {"v:\"b\"": {}}}}},
                {"manager": "m", "operation": "Apply", "fieldsV1": {"f:data": {"f:x": {}}}}
            ]},
            "data": {"x": "1", "y": "2"}
        });
        let p = project(&obj, "m", "v1", "Thing").unwrap();
        assert_eq!(
            p,
            json!({"apiVersion": "v1", "kind": "Thing", "metadata": {"name": "n", "finalizers": ["b"]}, "data": {"x": "1"}})
        );
    }
}
