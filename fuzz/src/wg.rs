//! `wg_import`: the wg-quick file a multihop exit is imported from (`multihop import_config`).

use phantom_daemon::multihop::wgconf::{self, ExitConfig};

/// Any text: refused with a reason, or a config that survives its own storage (JSON, as the
/// state directory keeps it) unchanged, with 32-byte keys and a named endpoint.
pub fn wg_import(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = wgconf::parse(text) else {
        return;
    };
    let config = parsed.config;
    let stored = serde_json::to_string(&config).expect("an exit config serialises");
    let back: ExitConfig = serde_json::from_str(&stored).expect("a stored exit config reads back");
    assert_eq!(back, config, "the stored exit config reads back unchanged");
    for key in [
        Some(&config.private_key),
        Some(&config.public_key),
        config.preshared_key.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        assert_eq!(key.trim(), key, "keys are kept trimmed");
    }
    assert!(
        !config.endpoint.host.is_empty(),
        "an endpoint names its host"
    );
    let _ = wgconf::provider(&config.endpoint.host, "exit");
}
