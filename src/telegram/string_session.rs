//! String sessions of other Telegram libraries, for users moving their
//! accounts over without logging in again.
//!
//! - Telethon: `'1'` + urlsafe base64 of `>B4sH256s` (IPv4) or `>B16sH256s`
//!   (IPv6): DC id, server address, port, auth key.
//! - Pyrogram: urlsafe base64 without padding of `>BI?256sQ?` (DC id, api id,
//!   test mode, auth key, user id, is bot), or the older `>B?256sI?` /
//!   `>B?256sQ?`. It carries no address: the DC's known one is used (the test
//!   servers' in test mode).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::Engine;

/// What a string session carries.
#[derive(Clone, PartialEq, Eq)]
pub struct Imported {
    pub dc_id: i32,
    /// The server to connect to; `None` means the DC's well-known address.
    pub server: Option<SocketAddr>,
    pub auth_key: [u8; 256],
    /// Which library the string came from, for messages.
    pub format: &'static str,
}

impl std::fmt::Debug for Imported {
    // The auth key is a credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imported")
            .field("dc_id", &self.dc_id)
            .field("server", &self.server)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Telegram's test servers, by DC (Pyrogram's test mode).
fn test_server(dc: i32) -> Option<SocketAddr> {
    let ip = match dc {
        1 => Ipv4Addr::new(149, 154, 175, 10),
        2 => Ipv4Addr::new(149, 154, 167, 40),
        3 => Ipv4Addr::new(149, 154, 175, 117),
        _ => return None,
    };
    Some(SocketAddr::new(IpAddr::V4(ip), 443))
}

fn key(bytes: &[u8]) -> [u8; 256] {
    let mut k = [0u8; 256];
    k.copy_from_slice(bytes);
    k
}

fn check_dc(dc: i32) -> Result<i32, String> {
    if (1..=5).contains(&dc) {
        Ok(dc)
    } else {
        Err(format!(
            "the session names datacenter {dc}; Telegram has 1 to 5"
        ))
    }
}

/// Parses a Telethon or Pyrogram string session; the error is one sentence.
pub fn parse(text: &str) -> Result<Imported, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the session string is empty".into());
    }
    let url = base64::engine::general_purpose::URL_SAFE;
    let url_nopad = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    if let Some(body) = text.strip_prefix('1') {
        if let Ok(b) = url.decode(body).or_else(|_| url_nopad.decode(body)) {
            if b.len() == 263 || b.len() == 275 {
                let dc = check_dc(i32::from(b[0]))?;
                let (ip, rest): (IpAddr, &[u8]) = if b.len() == 263 {
                    (IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4])), &b[5..])
                } else {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&b[1..17]);
                    (IpAddr::V6(Ipv6Addr::from(o)), &b[17..])
                };
                let port = u16::from_be_bytes([rest[0], rest[1]]);
                if port == 0 {
                    return Err("the Telethon session names port 0".into());
                }
                return Ok(Imported {
                    dc_id: dc,
                    server: Some(SocketAddr::new(ip, port)),
                    auth_key: key(&rest[2..258]),
                    format: "Telethon",
                });
            }
        }
    }
    let b = url_nopad.decode(text).map_err(|_| {
        "the session string is not a Telethon or Pyrogram string session (not base64)".to_string()
    })?;
    // (offset of test mode, offset of the auth key) by layout length.
    let (test_at, key_at) = match b.len() {
        271 => (5, 6), // >BI?256sQ?
        263 | 267 => (1, 2), // >B?256sI? and >B?256sQ?
        n => {
            return Err(format!(
                "the session string decodes to {n} bytes; a Telethon session has 263 or 275, a Pyrogram one 263, 267 or 271"
            ))
        }
    };
    let dc = check_dc(i32::from(b[0]))?;
    let server = match b[test_at] {
        0 => None,
        1 => Some(test_server(dc).ok_or_else(|| {
            format!("the Pyrogram session is for test DC {dc}, which has no known address")
        })?),
        _ => return Err("the string is not a Pyrogram session (bad test-mode flag)".into()),
    };
    Ok(Imported {
        dc_id: dc,
        server,
        auth_key: key(&b[key_at..key_at + 256]),
        format: "Pyrogram",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telethon(dc: u8, ip: &[u8], port: u16, k: u8) -> String {
        let mut b = vec![dc];
        b.extend_from_slice(ip);
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&[k; 256]);
        format!("1{}", base64::engine::general_purpose::URL_SAFE.encode(b))
    }

    #[test]
    fn telethon_ipv4_and_ipv6() {
        let s = parse(&telethon(2, &[149, 154, 167, 40], 443, 7)).unwrap();
        assert_eq!(s.dc_id, 2);
        assert_eq!(s.server, Some("149.154.167.40:443".parse().unwrap()));
        assert_eq!(s.auth_key, [7; 256]);
        assert_eq!(s.format, "Telethon");
        let v6 = Ipv6Addr::new(0x2001, 0x67c, 0x4e8, 0xf002, 0, 0, 0, 0xa);
        let s = parse(&telethon(4, &v6.octets(), 80, 9)).unwrap();
        assert_eq!(s.server, Some(SocketAddr::new(IpAddr::V6(v6), 80)));
        assert!(
            !format!("{s:?}").contains("9, 9"),
            "the key is never printed"
        );
    }

    #[test]
    fn pyrogram_layouts() {
        let mut b = vec![4u8];
        b.extend_from_slice(&123u32.to_be_bytes());
        b.push(0);
        b.extend_from_slice(&[5; 256]);
        b.extend_from_slice(&42u64.to_be_bytes());
        b.push(0);
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b);
        let s = parse(&text).unwrap();
        assert_eq!((s.dc_id, s.server, s.format), (4, None, "Pyrogram"));
        assert_eq!(s.auth_key, [5; 256]);
        b[5] = 1; // test mode
        b[0] = 2;
        let s = parse(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b)).unwrap();
        assert_eq!(s.server, Some("149.154.167.40:443".parse().unwrap()));
    }

    #[test]
    fn malformed_strings_get_one_sentence() {
        for (text, want) in [
            ("", "empty"),
            ("1!!!", "not base64"),
            ("AAAA", "decodes to"),
            (&telethon(9, &[1, 2, 3, 4], 443, 1)[..], "datacenter 9"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
