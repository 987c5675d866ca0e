//! Control-plane credentials: how a process presents its role's NATS user and Redis ACL user,
//! and how their URLs are shown without the secret.
//!
//! A process is given one URL per broker, either directly (`OH_NATS_URL`, `OH_REDIS_URL`) or
//! as a file holding the URL (`OH_NATS_URL_FILE`, `OH_REDIS_URL_FILE`, read once at startup;
//! the file wins), in the usual forms:
//!
//! - `nats://USER:PASSWORD@HOST:PORT` (several servers comma-separated; the first userinfo
//!   found is used for all), or `nats://TOKEN@HOST:PORT` for token authentication;
//! - `redis://USER:PASSWORD@HOST:PORT[/DB]` (Redis 6+ ACL user; redis-rs sends `AUTH user
//!   pass` itself).
//!
//! async-nats 0.51 ignores the userinfo of a server URL (its `CONNECT` carries only what
//! `ConnectOptions` holds), so [`nats_connect_options`] takes the userinfo out of the URL and
//! into `ConnectOptions::user_and_password` (or `token`), and the addresses handed to the
//! client carry no secret; its own debug logs name servers by them.
//!
//! **Invariant:** a [`BrokerUrl`] never prints its password: `Display` and `Debug` show
//! [`redact`]ed text (`nats://gateway:***@127.0.0.1:4222`); only [`BrokerUrl::expose`] gives
//! the secret, to the client library that connects.
//!
//! What each role may do on NATS and Redis is not decided here but by the brokers' own
//! configuration: the templates in `deploy/auth/` (see ARCHITECTURE.md).

use std::fmt;
use std::path::Path;

/// A broker URL that may carry credentials. Shown redacted; [`Self::expose`] gives the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    /// Takes a URL as given (surrounding whitespace removed).
    ///
    /// # Errors
    /// A message if the URL is empty or has no `scheme://`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty URL".to_owned());
        }
        for part in s.split(',') {
            if !part.trim().contains("://") {
                return Err("expected scheme://[user:password@]host:port".to_owned());
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// Reads a URL from a file (its whole content, trimmed; e.g. a mounted secret).
    ///
    /// # Errors
    /// A message naming the file if it cannot be read or holds no valid URL (never its
    /// content).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The URL with its credentials, for the client library only: never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the URL carries credentials (userinfo).
    pub fn has_credentials(&self) -> bool {
        self.0
            .split(',')
            .any(|u| split_userinfo(u.trim()).1.is_some())
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// clap value parser of a file holding a URL (`OH_NATS_URL_FILE`, `OH_REDIS_URL_FILE`).
///
/// # Errors
/// See [`BrokerUrl::from_file`].
pub fn parse_url_file(path: &str) -> Result<BrokerUrl, String> {
    BrokerUrl::from_file(Path::new(path))
}

/// Splits `scheme://[userinfo@]rest` into (`scheme://`, userinfo, rest).
fn split_userinfo(url: &str) -> (&str, Option<&str>, &str) {
    let (scheme, after) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    match after[..authority_end].rfind('@') {
        Some(at) => (scheme, Some(&after[..at]), &after[at + 1..]),
        None => (scheme, None, after),
    }
}

/// `url` with every password (or token) replaced by `***`: `nats://gateway:***@host:4222`,
/// `nats://***@host:4222` for a token. Comma-separated lists are redacted URL by URL; a URL
/// without userinfo comes back unchanged.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| match split_userinfo(u) {
            (scheme, Some(info), rest) => match info.split_once(':') {
                Some((user, _)) => format!("{scheme}{user}:***@{rest}"),
                None => format!("{scheme}***@{rest}"),
            },
            (_, None, _) => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes `%XX` escapes (userinfo in URLs is percent-encoded); invalid escapes stay as they
/// are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            // Two hex digits make at most 255.
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a NATS client authenticates, taken from a URL's userinfo.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials in the URL.
    None,
    /// `user:password@`.
    UserPassword(String, String),
    /// `token@`.
    Token(String),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword(user, _) => write!(f, "UserPassword({user:?}, \"***\")"),
            NatsAuth::Token(_) => f.write_str("Token(\"***\")"),
        }
    }
}

/// Splits a NATS URL (list) into its server addresses without userinfo, one per server (a
/// cluster's nodes: async-nats takes a list, not a comma-separated string), and the
/// credentials of the first URL that carries some.
pub fn split_nats_url(url: &BrokerUrl) -> (Vec<String>, NatsAuth) {
    let mut auth = NatsAuth::None;
    let mut servers = Vec::new();
    for u in url.expose().split(',') {
        let (scheme, info, rest) = split_userinfo(u.trim());
        if let (Some(info), NatsAuth::None) = (info, &auth) {
            auth = match info.split_once(':') {
                Some((user, pass)) => {
                    NatsAuth::UserPassword(percent_decode(user), percent_decode(pass))
                }
                None => NatsAuth::Token(percent_decode(info)),
            };
        }
        servers.push(format!("{scheme}{rest}"));
    }
    (servers, auth)
}

/// Connect options carrying the URL's credentials, and the server list to connect to (without
/// them): `let (opts, servers) = nats_connect_options(&url); opts.name(..).connect(servers)`.
pub fn nats_connect_options(url: &BrokerUrl) -> (async_nats::ConnectOptions, Vec<String>) {
    let (servers, auth) = split_nats_url(url);
    let opts = match auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::UserPassword(user, pass) => {
            async_nats::ConnectOptions::with_user_and_password(user, pass)
        }
        NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token),
    };
    (opts, servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords_and_tokens_only() {
        let cases = [
            (
                "nats://gateway:s3cr%40t@127.0.0.1:4222",
                "nats://gateway:***@127.0.0.1:4222",
            ),
            ("nats://tok3n@h:4222", "nats://***@h:4222"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            (
                "redis://worker:pw@[::1]:6379/0",
                "redis://worker:***@[::1]:6379/0",
            ),
            (
                "nats://a:x@h1:1,nats://a:x@h2:2",
                "nats://a:***@h1:1,nats://a:***@h2:2",
            ),
            // An `@` after the authority is not userinfo.
            ("redis://h:6379/0?x=a@b", "redis://h:6379/0?x=a@b"),
            // A password holding `@` (unencoded): the last `@` of the authority ends it.
            ("nats://u:p@ss@h:4222", "nats://u:***@h:4222"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact(url), shown, "{url}");
            let b = BrokerUrl::parse(url).unwrap();
            assert_eq!(b.to_string(), shown);
            assert_eq!(format!("{b:?}"), format!("{shown:?}"));
            assert!(!format!("{b} {b:?}").contains("s3cr"));
        }
    }

    #[test]
    fn nats_credentials_move_out_of_the_url() {
        let url = BrokerUrl::parse("nats://gateway:s3cr%40t@127.0.0.1:4222").unwrap();
        assert!(url.has_credentials());
        let (servers, auth) = split_nats_url(&url);
        assert_eq!(servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(
            auth,
            NatsAuth::UserPassword("gateway".into(), "s3cr@t".into())
        );
        assert!(!format!("{auth:?}").contains("s3cr"));
        let url = BrokerUrl::parse("nats://h1:1, nats://t@h2:2").unwrap();
        let (servers, auth) = split_nats_url(&url);
        assert_eq!(servers, ["nats://h1:1", "nats://h2:2"]);
        assert_eq!(auth, NatsAuth::Token("t".into()));
        // What the client connects to: every node of the list.
        use async_nats::ToServerAddrs;
        assert_eq!(servers.to_server_addrs().unwrap().count(), 2);
        let plain = BrokerUrl::parse("nats://127.0.0.1:4222").unwrap();
        assert!(!plain.has_credentials());
        assert_eq!(split_nats_url(&plain).1, NatsAuth::None);
        assert!(BrokerUrl::parse(" ").is_err());
        assert!(BrokerUrl::parse("127.0.0.1:4222").is_err());
    }

    #[test]
    fn url_files_are_read_trimmed_and_errors_never_show_the_content() {
        let dir = std::env::temp_dir().join(format!("oh-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("url");
        std::fs::write(&f, "redis://worker:pw@127.0.0.1:6379\n").unwrap();
        let url = parse_url_file(f.to_str().unwrap()).unwrap();
        assert_eq!(url.expose(), "redis://worker:pw@127.0.0.1:6379");
        std::fs::write(&f, "worker:pw\n").unwrap();
        let err = parse_url_file(f.to_str().unwrap()).unwrap_err();
        assert!(!err.contains("pw"), "{err}");
        assert!(parse_url_file(dir.join("missing").to_str().unwrap()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
