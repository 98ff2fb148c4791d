//! Every provider of the user's configuration routed through the model face, with no
//! configuration (docs/model-side.md, "No configuration").
//!
//! The runtime resolves its providers from many places (configuration files, environment keys,
//! stored logins, its models.dev catalogue); `GET /config/providers` is the result. For each
//! provider this module finds the one URL its requests go to, and writes the configuration
//! overlay that points the provider at the face instead (`/p/<id>`): the runtime merges
//! `OPENCODE_CONFIG_CONTENT` over every file, and a provider's `options.baseURL` wins over its
//! models' own URLs. Credentials are not part of any of this: they stay in the runtime's own
//! headers, which the face passes through.
//!
//! Pure: the list comes in, routes and the overlay go out.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::config::{provider_id_is_routable, provider_url};
use crate::opencode::{Provider, ProviderList};

/// The URL an AI SDK package calls when neither the configuration nor models.dev names one
/// (each package's documented default `baseURL`).
const SDK_DEFAULTS: &[(&str, &str)] = &[
    ("@ai-sdk/anthropic", "https://api.anthropic.com/v1"),
    ("@ai-sdk/openai", "https://api.openai.com/v1"),
    ("@ai-sdk/groq", "https://api.groq.com/openai/v1"),
    ("@ai-sdk/mistral", "https://api.mistral.ai/v1"),
    ("@ai-sdk/xai", "https://api.x.ai/v1"),
    (
        "@ai-sdk/google",
        "https://generativelanguage.googleapis.com/v1beta",
    ),
    ("@ai-sdk/deepseek", "https://api.deepseek.com/v1"),
    (
        "@openrouter/ai-sdk-provider",
        "https://openrouter.ai/api/v1",
    ),
];

/// Packages that sign each request over its host name (AWS SigV4): a request sent to the face's
/// address would carry a signature the provider rejects, so these stay direct.
const SIGNED: &[&str] = &["@ai-sdk/amazon-bedrock"];

/// What [`resolve`] decided for each provider.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Provider id → the real URL its requests go to.
    pub routed: BTreeMap<String, String>,
    /// Provider id → why it stays direct (said once at start, so the user knows).
    pub direct: BTreeMap<String, String>,
}

/// Finds the real URL of every provider in `list`.
pub fn resolve(list: &ProviderList) -> Resolved {
    let mut resolved = Resolved::default();
    for provider in &list.providers {
        match real_url(provider) {
            Ok(url) => {
                resolved.routed.insert(provider.id.clone(), url);
            }
            Err(why) => {
                resolved.direct.insert(provider.id.clone(), why);
            }
        }
    }
    resolved
}

/// The one URL all of `provider`'s requests go to, or why there is none the face can stand in
/// for.
fn real_url(provider: &Provider) -> Result<String, String> {
    if !provider_id_is_routable(&provider.id) {
        return Err("its id cannot be a path segment".to_owned());
    }
    if let Some(npm) = provider
        .models
        .values()
        .map(|m| m.api.npm.as_str())
        .find(|npm| SIGNED.iter().any(|s| npm.starts_with(s)))
    {
        return Err(format!(
            "{npm} signs each request for the provider's own host"
        ));
    }
    let url = match provider.base_url() {
        Some(url) => url.to_owned(),
        None => {
            let mut urls = provider.models.values().map(|m| {
                if m.api.url.is_empty() {
                    SDK_DEFAULTS
                        .iter()
                        .find(|(npm, _)| *npm == m.api.npm)
                        .map(|(_, url)| (*url).to_owned())
                        .ok_or_else(|| format!("no URL is known for {:?}", m.api.npm))
                } else {
                    Ok(m.api.url.clone())
                }
            });
            let first = urls.next().ok_or("it lists no model")??;
            for url in urls {
                if url? != first {
                    return Err("its models are served from different URLs".to_owned());
                }
            }
            first
        }
    };
    provider_url(&url).map(|_| url)
}

/// Why an existing `OPENCODE_CONFIG_CONTENT` cannot take the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("OPENCODE_CONFIG_CONTENT is set but is not a JSON object ({0}); taskgate cannot add its provider URLs to it")]
    NotAnObject(String),
}

/// `existing` (the user's own `OPENCODE_CONFIG_CONTENT`, if any) with each routed provider's
/// `options.baseURL` set to `face/p/<id>`. Everything else of `existing` is kept.
pub fn overlay(
    face: &str,
    routed: &BTreeMap<String, String>,
    existing: Option<&str>,
) -> Result<String, OverlayError> {
    let mut root = match existing.map(str::trim).filter(|t| !t.is_empty()) {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(OverlayError::NotAnObject("not an object".to_owned())),
            Err(e) => return Err(OverlayError::NotAnObject(e.to_string())),
        },
    };
    let providers = object_at(&mut root, "provider");
    for id in routed.keys() {
        let options = object_at(object_at(providers, id), "options");
        options.insert(
            "baseURL".to_owned(),
            json!(format!(
                "{}{}/{id}",
                face.trim_end_matches('/'),
                super::NAMED_PREFIX
            )),
        );
    }
    Ok(Value::Object(root).to_string())
}

/// `map[key]` as an object, made one (replacing a non-object) when it is not.
fn object_at<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = map
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(inner) => inner,
        // Made an object just above.
        _ => unreachable!("slot is an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `GET /config/providers` on opencode-ai 1.18.33 (recorded with
    /// `ANTHROPIC_API_KEY` set and one configured provider), trimmed to what is read.
    fn list() -> ProviderList {
        serde_json::from_value(json!({"providers": [
            {"id": "anthropic", "key": "sk-ant-x", "options": {"headers": {}},
             "models": {"claude-haiku-4-5": {"api": {"url": "", "npm": "@ai-sdk/anthropic"}}}},
            {"id": "opencode", "options": {},
             "models": {"a": {"api": {"url": "https://opencode.ai/zen/v1", "npm": "@ai-sdk/openai"}},
                        "b": {"api": {"url": "https://opencode.ai/zen/v1", "npm": "@ai-sdk/openai-compatible"}}}},
            {"id": "mock", "options": {"baseURL": "http://127.0.0.1:9/v1", "apiKey": "not-a-secret"},
             "models": {"scripted": {"api": {"url": "", "npm": "@ai-sdk/openai-compatible"}}}},
            {"id": "amazon-bedrock", "options": {},
             "models": {"m": {"api": {"url": "", "npm": "@ai-sdk/amazon-bedrock"}}}},
            {"id": "mixed", "options": {},
             "models": {"a": {"api": {"url": "https://a.example/v1", "npm": "@ai-sdk/openai-compatible"}},
                        "b": {"api": {"url": "https://b.example/v1", "npm": "@ai-sdk/openai-compatible"}}}},
            {"id": "odd", "options": {},
             "models": {"a": {"api": {"url": "", "npm": "some-unknown-provider"}}}}
        ]}))
        .unwrap()
    }

    #[test]
    fn each_provider_gets_its_configured_catalogue_or_sdk_url() {
        let r = resolve(&list());
        assert_eq!(r.routed["anthropic"], "https://api.anthropic.com/v1");
        assert_eq!(r.routed["opencode"], "https://opencode.ai/zen/v1");
        assert_eq!(r.routed["mock"], "http://127.0.0.1:9/v1");
        assert_eq!(r.routed.len(), 3, "{r:?}");
        assert!(r.direct["amazon-bedrock"].contains("signs"));
        assert!(r.direct["mixed"].contains("different URLs"));
        assert!(r.direct["odd"].contains("some-unknown-provider"));
    }

    #[test]
    fn overlay_points_routed_providers_at_the_face_and_keeps_the_users_content() {
        let r = resolve(&list());
        let existing = r#"{"provider":{"mock":{"options":{"timeout":1000}}},"share":"disabled"}"#;
        let text = overlay("http://127.0.0.1:4098/", &r.routed, Some(existing)).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["share"], "disabled");
        assert_eq!(v["provider"]["mock"]["options"]["timeout"], 1000);
        assert_eq!(
            v["provider"]["mock"]["options"]["baseURL"],
            "http://127.0.0.1:4098/p/mock"
        );
        assert_eq!(
            v["provider"]["anthropic"]["options"]["baseURL"],
            "http://127.0.0.1:4098/p/anthropic"
        );
        assert!(v["provider"].get("amazon-bedrock").is_none());
        assert!(!text.contains("sk-ant-x") && !text.contains("not-a-secret"));
    }

    #[test]
    fn content_that_is_not_a_json_object_is_refused_not_replaced() {
        let err = overlay("http://x", &BTreeMap::new(), Some("// jsonc {")).unwrap_err();
        assert!(err.to_string().contains("OPENCODE_CONFIG_CONTENT"));
    }
}
