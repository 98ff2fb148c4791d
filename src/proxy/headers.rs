//! Header policy of the forwarder, as pure functions over a [`HeaderMap`] (no I/O), so each rule
//! is pinned by a unit test.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The fields RFC 9110 §7.6.1 names as connection-specific, plus `Trailer` (RFC 9110 §6.6.2
/// describes the trailer section of *this* message, whose framing the next hop re-derives).
/// `Proxy-*` fields are matched by prefix in [`is_hop_by_hop`].
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` is hop-by-hop by itself (whatever `Connection` lists).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str().starts_with("proxy-")
}

/// Removes the hop-by-hop fields of a message about to be forwarded.
///
/// RFC 9110 §7.6.1:
///
/// > Intermediaries MUST parse a received Connection header field before a message is forwarded
/// > and, for each connection-option in this field, remove any header or trailer field(s) from the
/// > message with the same name as the connection-option, and then remove the Connection header
/// > field itself (or replace it with the intermediary's own control options for the forwarded
/// > message).
/// >
/// > Furthermore, intermediaries SHOULD remove or replace fields that are known to require removal
/// > before forwarding, whether or not they appear as a connection-option, after applying those
/// > fields' semantics. This includes but is not limited to: Proxy-Connection, Keep-Alive, TE,
/// > Transfer-Encoding, Upgrade.
///
/// So: every name listed in any `Connection` field (case-insensitive, comma-separated, blanks
/// and unparsable entries ignored), then `Connection`, `Keep-Alive`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade` and every `Proxy-*` field. Everything else is end-to-end and
/// stays, repeated fields in their order. Framing (`Content-Length` or chunked) is left to hyper,
/// which derives it from the body it is given.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

/// The protocol a request asks to switch to (`Upgrade: websocket`), when it really asks: HTTP/1.1
/// requires `Connection` to list `upgrade` too (RFC 9110 §7.8).
pub fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_lists_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if connection_lists_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Whether the client said it accepts trailers (`TE: trailers`); the only `TE` value worth
/// carrying to the next hop, so it is put back after [`strip_hop_by_hop`].
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    lists(headers, header::TE, "trailers")
}

/// Whether the client asks for an event stream (`Accept: text/event-stream`, the media type of
/// the WHATWG HTML standard's server-sent events).
pub fn accepts_event_stream(headers: &HeaderMap) -> bool {
    lists(headers, header::ACCEPT, "text/event-stream")
}

/// Whether any `name` field, a comma-separated list, has `item` (case-insensitive) as an
/// element, its parameters (after `;`) aside.
fn lists(headers: &HeaderMap, name: HeaderName, item: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|element| {
            element
                .split(';')
                .next()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case(item))
        })
}

/// Adds the de-facto `X-Forwarded-*` fields.
///
/// - `X-Forwarded-For`: the peer's address is appended to any list the client sent, so a chain
///   of proxies stays readable left to right.
/// - `X-Forwarded-Proto` (`http`: taskgate only speaks plain HTTP) and `X-Forwarded-Host` (the
///   `Host` the client asked for) are set only when absent: a proxy in front of taskgate that set
///   them knew better (it terminated TLS, it saw the public host name).
///
/// `peer` is [`forwarded_for`] of the client's address, made once per connection.
pub fn add_forwarded(headers: &mut HeaderMap, peer: &HeaderValue) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
    // One lookup per field (entries), since this runs on every forwarded request.
    match headers.entry(XFF) {
        header::Entry::Vacant(entry) => {
            entry.insert(peer.clone());
        }
        header::Entry::Occupied(mut entry) => {
            let prior: Vec<&str> = entry.iter().filter_map(|v| v.to_str().ok()).collect();
            let chain = if prior.is_empty() {
                Some(peer.clone())
            } else {
                let peer = peer.to_str().unwrap_or_default();
                HeaderValue::from_str(&format!("{}, {peer}", prior.join(", "))).ok()
            };
            if let Some(chain) = chain {
                entry.insert(chain);
            }
        }
    }
    headers
        .entry(XFP)
        .or_insert_with(|| HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.entry(XFH).or_insert(host);
    }
}

/// The client's address as an `X-Forwarded-For` entry (an IPv6 address bare, without
/// brackets). Made once per connection: formatting it on every request was 7 % of the
/// forward path's instructions (docs/performance.md).
pub fn forwarded_for(peer: IpAddr) -> HeaderValue {
    HeaderValue::try_from(peer.to_string()).expect("an IP address is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        h.keys().map(|k| k.as_str()).collect()
    }

    #[test]
    fn removes_the_fixed_hop_by_hop_fields() {
        let mut h = map(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type"]);
    }

    #[test]
    fn removes_fields_named_by_connection_in_any_case_and_spacing() {
        let mut h = map(&[
            ("connection", " X-Secret ,, x-other;bad , "),
            ("connection", "X-Third"),
            ("x-secret", "1"),
            ("x-third", "3"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-kept"]);
    }

    #[test]
    fn ignores_connection_values_that_are_not_text() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-a, \xff").unwrap(),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-a"]);
    }

    #[test]
    fn keeps_end_to_end_fields_and_repeated_values_in_order() {
        let mut h = map(&[
            ("authorization", "Basic b3BlbmNvZGU6eA=="),
            ("x-opencode-directory", "%2Fhome%2Fdev"),
            ("x-opencode-workspace", "ws_1"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("set-cookie", "c=3"),
            ("set-cookie", "d=4"),
            ("content-length", "12"),
        ]);
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        let cookies: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn an_upgrade_needs_both_connection_upgrade_and_upgrade() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_request(&ws).unwrap(), "websocket");
        let no_token = map(&[("connection", "keep-alive"), ("upgrade", "websocket")]);
        assert!(upgrade_request(&no_token).is_none());
        let no_upgrade = map(&[("connection", "upgrade")]);
        assert!(upgrade_request(&no_upgrade).is_none());
    }

    #[test]
    fn te_trailers_is_recognised_among_other_codings() {
        assert!(accepts_trailers(&map(&[("te", "gzip;q=0.5, Trailers")])));
        assert!(!accepts_trailers(&map(&[("te", "gzip")])));
        assert!(!accepts_trailers(&HeaderMap::new()));
    }

    #[test]
    fn an_event_stream_is_recognised_among_the_accepted_types() {
        assert!(accepts_event_stream(&map(&[(
            "accept",
            "text/event-stream"
        )])));
        assert!(accepts_event_stream(&map(&[(
            "accept",
            "application/json;q=0.5, Text/Event-Stream; q=1"
        )])));
        assert!(!accepts_event_stream(&map(&[(
            "accept",
            "text/event-streams"
        )])));
        assert!(!accepts_event_stream(&map(&[("accept", "*/*")])));
        assert!(!accepts_event_stream(&HeaderMap::new()));
    }

    #[test]
    fn forwarded_for_appends_to_an_existing_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("host", "example.test:4097"),
        ]);
        add_forwarded(&mut h, &forwarded_for("127.0.0.1".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.test:4097");
    }

    #[test]
    fn forwarded_proto_and_host_from_an_outer_proxy_are_kept() {
        let mut h = map(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
            ("host", "127.0.0.1:4097"),
        ]);
        add_forwarded(&mut h, &forwarded_for("::1".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "public.example");
    }
}
