//! `GET /config/providers`: the providers the runtime resolved for a directory (its own
//! configuration files, `OPENCODE_CONFIG_CONTENT`, environment keys, stored logins, and the
//! models.dev catalogue it ships with), each with the models it offers.
//!
//! Only what tells where a provider's requests go is read. The reply also carries each
//! provider's API key (`key`, `options.apiKey`): those fields are deliberately not named here,
//! so they are dropped at parse time and can never reach a log or an error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// The reply of `GET /config/providers`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProviderList {
    #[serde(default)]
    pub providers: Vec<Provider>,
}

/// One provider the runtime can call.
#[derive(Debug, Clone, Deserialize)]
pub struct Provider {
    pub id: String,
    #[serde(default)]
    pub options: ProviderOptions,
    #[serde(default)]
    pub models: BTreeMap<String, ProviderModel>,
}

/// The provider options the runtime hands its SDK; only the base URL matters here.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProviderOptions {
    /// `options.baseURL`: wins over each model's `api.url` (observed on 1.18.33: a provider
    /// whose models name `https://opencode.ai/zen/v1` sends to the configured `baseURL`).
    /// Kept as a raw value: a configuration may put anything there.
    #[serde(rename = "baseURL", default)]
    pub base_url: Option<Value>,
}

/// One model of a provider.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProviderModel {
    #[serde(default)]
    pub api: ModelApi,
}

/// Where and how a model is called.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelApi {
    /// The models.dev `api` URL; empty when the SDK's own default applies.
    #[serde(default)]
    pub url: String,
    /// The AI SDK package that speaks to it (`@ai-sdk/anthropic`, `@ai-sdk/openai-compatible`).
    #[serde(default)]
    pub npm: String,
}

impl Provider {
    /// `options.baseURL` when it is a non-empty string.
    pub fn base_url(&self) -> Option<&str> {
        self.options
            .base_url
            .as_ref()
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_the_reply_are_never_kept() {
        let reply = r#"{"providers":[{"id":"anthropic","source":"env","key":"sk-ant-secret",
            "options":{"apiKey":"sk-ant-secret","headers":{}},
            "models":{"claude":{"id":"claude","api":{"id":"claude","url":"","npm":"@ai-sdk/anthropic"}}}}],
            "default":{"anthropic":"claude"}}"#;
        let list: ProviderList = serde_json::from_str(reply).unwrap();
        assert!(!format!("{list:?}").contains("sk-ant-secret"));
        assert_eq!(
            list.providers[0].models["claude"].api.npm,
            "@ai-sdk/anthropic"
        );
        assert_eq!(list.providers[0].base_url(), None);
    }
}
