//! Cross-platform consistency, as the seeds' drift report has it: the management platform's
//! record of a tenant against the configuration its ISP instance runs (plan, features,
//! billing gateway), each difference with an impact and a recommendation. Pure.

use crate::load::yaml;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub tenant: String,
    pub path: String,
    pub management_value: Value,
    pub isp_framework_value: Value,
    /// low | medium | high
    pub impact: String,
    pub recommendation: String,
}

/// Compares a management record (`management.tenant` content) with an ISP config text.
/// Fields the ISP config does not carry (a template that leaves them out) are not compared.
pub fn consistency(tenant: &str, management: &Value, isp_config: &str) -> Vec<Difference> {
    let Ok(mut docs) = yaml::parse_documents(isp_config) else {
        return vec![Difference {
            tenant: tenant.to_owned(),
            path: "isp_config".into(),
            management_value: Value::Null,
            isp_framework_value: Value::String("(not readable YAML)".into()),
            impact: "high".into(),
            recommendation: "Re-deliver the ISP Framework configuration from the repository (apply)".into(),
        }];
    };
    let isp = if docs.len() == 1 { docs.remove(0).value } else { Value::Null };
    let mut out = Vec::new();
    // The texts of a difference are made only for one found: a check of 10,000 tenants that
    // agree made some 200,000 of them for nothing.
    let mut diff = |path: &dyn Fn() -> String, m: &Value, i: &Value, impact: &str, rec: &dyn Fn() -> String| {
        if m != i {
            out.push(Difference {
                tenant: tenant.to_owned(),
                path: path(),
                management_value: m.clone(),
                isp_framework_value: i.clone(),
                impact: impact.to_owned(),
                recommendation: rec(),
            });
        }
    };
    // Keys looked up one by one: `Value::pointer` allocates two strings per key, and this
    // runs for every tenant at plan and at apply.
    fn at<'v>(v: &'v Value, a: &str, b: &str) -> Option<&'v Value> {
        v.get(a).and_then(|v| v.get(b))
    }
    if let (Some(m), Some(i)) = (management.get("plan"), at(&isp, "plan", "name")) {
        diff(&|| "plan".into(), m, i, "high", &|| format!("Update the ISP Framework plan to {}", show(m)));
    }
    if let (Some(m), Some(i)) = (at(management, "billing", "gateway"), at(&isp, "billing", "gateway")) {
        diff(&|| "billing_gateway".into(), m, i, "medium", &|| format!("Update ISP Framework to {}", show(m)));
    }
    if let (Some(Value::Array(m)), Some(i)) = (management.get("features"), isp.get("features")) {
        let enabled_in_isp = |f: &str| match i.get(f) {
            Some(Value::String(s)) => s == "enabled" || s == "true",
            Some(Value::Bool(b)) => *b,
            _ => false,
        };
        let mut all: Vec<&str> = m.iter().filter_map(Value::as_str).collect();
        if let Some(obj) = i.as_object() {
            all.extend(obj.keys().map(String::as_str));
        }
        all.sort_unstable();
        all.dedup();
        for f in all {
            let in_mgmt = Value::Bool(m.iter().any(|v| v.as_str() == Some(f)));
            let in_isp = Value::Bool(enabled_in_isp(f));
            diff(&|| format!("feature_flags.{f}"), &in_mgmt, &in_isp, "high", &|| format!("Sync {f} feature flag"));
        }
    }
    out
}

fn show(v: &Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_like_the_seed() {
        let m = json!({"plan": "premium", "features": ["analytics", "reporting"], "billing": {"gateway": "stripe_v2"}});
        let isp = "plan:\n  name: premium\nfeatures:\n  analytics: enabled\nbilling:\n  gateway: stripe_v1\n";
        let d = consistency("t1", &m, isp);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].path, "billing_gateway");
        assert_eq!(d[0].recommendation, "Update ISP Framework to stripe_v2");
        assert_eq!(d[1].path, "feature_flags.reporting");
        assert_eq!((d[1].impact.as_str(), d[1].recommendation.as_str()), ("high", "Sync reporting feature flag"));
    }
}
