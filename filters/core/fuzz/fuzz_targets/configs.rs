//! Every filter's configuration compiler on arbitrary bytes (the first byte picks the filter):
//! never a panic, and a refusal is always a `config error at <field>` line.
#![no_main]

use gatehouse_core::jwt_auth::JwtAuthConfig;
use gatehouse_core::page_guard::PageGuardConfig;
use gatehouse_core::session_binding::SessionBindingConfig;
use gatehouse_core::token_proxy::TokenProxyConfig;
use gatehouse_core::turn::TurnConfig;
use libfuzzer_sys::fuzz_target;

fn env(name: &str) -> Option<String> {
    match name {
        "KEYS" => Some("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into()),
        "SECRET" => Some("0123456789abcdef0123".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let error = match which % 5 {
        0 => JwtAuthConfig::compile(text).err(),
        1 => SessionBindingConfig::compile(text).err(),
        2 => PageGuardConfig::compile(text, &env).err(),
        3 => TokenProxyConfig::compile(text, &env).err(),
        _ => TurnConfig::compile(text, &env).err(),
    };
    if let Some(e) = error {
        assert!(e.to_string().starts_with("config error"), "{e}");
    }
});
