//! `dotmac.toml`: the repository's settings.

use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub format: u32,
    #[serde(default)]
    pub state: StateSettings,
    #[serde(default)]
    pub providers: Providers,
    #[serde(default)]
    pub render: RenderSettings,
    #[serde(default)]
    pub apply: ApplySettings,
    #[serde(default)]
    pub daemon: DaemonSettings,
    #[serde(default)]
    pub notifications: NotificationSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            format: 1,
            state: StateSettings::default(),
            providers: Providers::default(),
            render: RenderSettings::default(),
            apply: ApplySettings::default(),
            daemon: DaemonSettings::default(),
            notifications: NotificationSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StateSettings {
    #[serde(default = "local")]
    pub backend: String,
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings { backend: local(), dir: None, url: None, url_env: None }
    }
}

fn local() -> String {
    "local".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Providers {
    #[serde(default)]
    pub management: ProviderSettings,
    #[serde(default)]
    pub isp: ProviderSettings,
    #[serde(default)]
    pub kubernetes: ProviderSettings,
    #[serde(default)]
    pub secrets: ProviderSettings,
}

/// One provider's settings: its kind, and the options that kind reads (checked by the schema).
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSettings {
    pub kind: String,
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        ProviderSettings { kind: local(), options: Map::new() }
    }
}

impl ProviderSettings {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.options.get(key).and_then(Value::as_str)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RenderSettings {
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    #[serde(default = "default_max_output")]
    pub max_output_bytes: usize,
}

impl Default for RenderSettings {
    fn default() -> Self {
        RenderSettings { fuel: default_fuel(), max_output_bytes: default_max_output() }
    }
}

fn default_fuel() -> u64 {
    1_000_000
}
fn default_max_output() -> usize {
    4 * 1024 * 1024
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ApplySettings {
    #[serde(default)]
    pub parallelism: Option<usize>,
}

/// `[daemon]`: how the daemon reconciles this repository. Durations are checked by the
/// schema; the command line's `--interval` and `--concurrency` win over these.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct DaemonSettings {
    /// How often every tenant is checked for drift (default 1m).
    #[serde(default)]
    pub interval: Option<String>,
    /// Tenant batches reconciled at the same time (default 2).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Self-heal attempts in a row before the daemon stops healing a tenant (default 5).
    #[serde(default)]
    pub self_heal_attempts: Option<u32>,
    /// The first wait after a failure (default 5s); it doubles on each failure in a row.
    #[serde(default)]
    pub backoff_initial: Option<String>,
    /// The longest wait after failures (default 5m).
    #[serde(default)]
    pub backoff_max: Option<String>,
}

/// `[notifications]`: where the daemon reports what it does.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct NotificationSettings {
    #[serde(default)]
    pub webhooks: Vec<WebhookSettings>,
}

/// One `[[notifications.webhooks]]`: events are POSTed to `url` as JSON, signed with
/// HMAC-SHA256 under the key in the variable `secret_env`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct WebhookSettings {
    pub url: String,
    /// The events to send (default: all).
    #[serde(default)]
    pub events: Vec<String>,
    pub secret_env: String,
    /// Per request (default 10s).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Tries per event (default 5).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub circuit_breaker: Option<BreakerSettings>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct BreakerSettings {
    #[serde(default)]
    pub failures: Option<u32>,
    #[serde(default)]
    pub reset_after: Option<String>,
}

/// Parses a duration setting such as `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(digits_end);
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert!(parse_duration("5 minutes").is_none());
        assert!(parse_duration("s").is_none());
    }
}
