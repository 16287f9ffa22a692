//! When a Deployment's rollout is complete: the rules of `kubectl rollout status`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// Every replica runs the new template and is available.
    Complete,
    /// Still going; the text says how far.
    Progressing(String),
    /// The Deployment controller gave up (progress deadline exceeded).
    Failed(String),
}

fn int(v: &Value, pointer: &str) -> Option<i64> {
    v.pointer(pointer).and_then(Value::as_i64)
}

/// The rollout state of a live Deployment, for the `generation` our write produced.
pub fn status(deployment: &Value, generation: i64) -> Rollout {
    let observed = int(deployment, "/status/observedGeneration").unwrap_or(0);
    if observed < generation {
        return Rollout::Progressing(format!(
            "the Deployment controller has not yet seen generation {generation} (it has seen {observed})"
        ));
    }
    if let Some(conds) = deployment.pointer("/status/conditions").and_then(Value::as_array) {
        for c in conds {
            if c.get("type").and_then(Value::as_str) == Some("Progressing")
                && c.get("reason").and_then(Value::as_str) == Some("ProgressDeadlineExceeded")
            {
                let msg = c.get("message").and_then(Value::as_str).unwrap_or("progress deadline exceeded");
                return Rollout::Failed(msg.to_owned());
            }
        }
    }
    let want = int(deployment, "/spec/replicas").unwrap_or(1);
    let updated = int(deployment, "/status/updatedReplicas").unwrap_or(0);
    let total = int(deployment, "/status/replicas").unwrap_or(0);
    let available = int(deployment, "/status/availableReplicas").unwrap_or(0);
    if updated < want {
        return Rollout::Progressing(format!("{updated} of {want} replicas updated"));
    }
    if total > updated {
        return Rollout::Progressing(format!("{} old replicas pending termination", total - updated));
    }
    if available < updated {
        return Rollout::Progressing(format!("{available} of {updated} updated replicas available"));
    }
    Rollout::Complete
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(observed: i64, updated: i64, total: i64, available: i64) -> Value {
        json!({"spec": {"replicas": 2}, "status": {
            "observedGeneration": observed, "updatedReplicas": updated, "replicas": total, "availableReplicas": available}})
    }

    #[test]
    fn the_steps_of_a_rollout() {
        assert!(matches!(status(&d(1, 2, 2, 2), 2), Rollout::Progressing(m) if m.contains("generation 2")));
        assert_eq!(status(&d(2, 1, 3, 2), 2), Rollout::Progressing("1 of 2 replicas updated".into()));
        assert_eq!(status(&d(2, 2, 3, 2), 2), Rollout::Progressing("1 old replicas pending termination".into()));
        assert_eq!(status(&d(2, 2, 2, 1), 2), Rollout::Progressing("1 of 2 updated replicas available".into()));
        assert_eq!(status(&d(2, 2, 2, 2), 2), Rollout::Complete);
        assert_eq!(
            status(&json!({"spec": {"replicas": 0}, "status": {"observedGeneration": 4}}), 4),
            Rollout::Complete
        );
        let mut stuck = d(2, 1, 2, 1);
        stuck["status"]["conditions"] = json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}]);
        assert_eq!(status(&stuck, 2), Rollout::Failed("too slow".into()));
    }
}
