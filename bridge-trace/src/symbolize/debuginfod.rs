//! Debug files by build-id from debuginfod servers, for the modules a machine has no debug
//! information for (a distribution's stripped server, a stripped build of our own). Opt-in
//! (`--debuginfod URL` or `DEBUGINFOD_URLS`), as perf and Perfetto made it, for the stalls a
//! network fetch can cause: every request has a deadline, each build-id is asked for once per
//! run, and after a failure other than "not found" the servers are not asked again. Files are
//! kept in the debuginfod client cache that gdb and perf share (`DEBUGINFOD_CACHE_PATH`, else
//! `~/.cache/debuginfod_client`, one `BUILD-ID/debuginfo` per file).
use std::{collections::HashMap, io::Read, path::PathBuf, time::Duration};

use debuginfod::{BuildId, CachingClient, Client, HttpClient, HttpClientError, Readable};

use crate::{
    error::{Error, Result},
    model::maps::hex,
};

/// How long one request may take, connection to last byte, unless `DEBUGINFOD_TIMEOUT`
/// (seconds, as elfutils reads it) says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Which servers to ask, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebuginfodConfig {
    pub urls: Vec<String>,
    pub timeout: Duration,
}

impl DebuginfodConfig {
    /// The servers given with `--debuginfod`, else those of `DEBUGINFOD_URLS` (space-separated,
    /// as elfutils reads it); `None` when there are neither.
    pub fn from_flags_or_env(flags: &[String]) -> Result<Option<DebuginfodConfig>> {
        let urls: Vec<String> = if flags.is_empty() {
            let from_env = std::env::var("DEBUGINFOD_URLS").unwrap_or_default();
            from_env.split_whitespace().map(str::to_string).collect()
        } else {
            flags.to_vec()
        };
        if urls.is_empty() {
            return Ok(None);
        }
        for url in &urls {
            let ok = url.starts_with("http://") || url.starts_with("https://");
            if !ok || url.split("://").nth(1).is_none_or(str::is_empty) {
                return Err(Error::Usage(format!(
                    "debuginfod server '{url}': not an http:// or https:// URL"
                )));
            }
        }
        let timeout = match std::env::var("DEBUGINFOD_TIMEOUT") {
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs),
                _ => {
                    return Err(Error::Usage(format!(
                        "DEBUGINFOD_TIMEOUT '{s}': not a number of seconds"
                    )))
                }
            },
            Err(_) => DEFAULT_TIMEOUT,
        };
        Ok(Some(DebuginfodConfig { urls, timeout }))
    }
}

/// The blocking HTTP client the debuginfod crate asks through: ureq, with one deadline for the
/// whole request.
#[derive(Debug)]
struct Http(ureq::Agent);

/// A response body (ureq's reader is not `Debug`).
struct Body(Box<dyn Read + Send + Sync>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Body")
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl HttpClient for Http {
    fn get(&self, url: &str) -> std::result::Result<Box<dyn Readable>, HttpClientError> {
        match self.0.get(url).call() {
            Ok(response) => Ok(Box::new(Body(response.into_reader()))),
            Err(ureq::Error::Status(code, _)) => Err(HttpClientError::StatusCode(
                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
            )),
            Err(e) => Err(HttpClientError::Other(Box::new(e))),
        }
    }
}

/// The client cache, where elfutils keeps it too: `DEBUGINFOD_CACHE_PATH`, else
/// `$XDG_CACHE_HOME/debuginfod_client`, else `~/.cache/debuginfod_client`.
fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("DEBUGINFOD_CACHE_PATH")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("debuginfod_client")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/debuginfod_client")))
}

/// A debuginfod client for one run.
pub struct Debuginfod {
    client: CachingClient,
    cache: PathBuf,
    urls: String,
    /// By build-id: the debug file, or why there is none.
    fetched: HashMap<String, std::result::Result<PathBuf, String>>,
    /// Set by a failure that is not "not found": the servers are not asked again.
    failed: Option<String>,
}

impl Debuginfod {
    /// A client for `config`'s servers, keeping files in the client cache ([`cache_dir`]).
    pub fn new(config: &DebuginfodConfig) -> Result<Debuginfod> {
        let cache = cache_dir().ok_or_else(|| {
            Error::Usage("debuginfod: no cache directory: set DEBUGINFOD_CACHE_PATH".into())
        })?;
        Debuginfod::with_cache(config, cache)
    }

    /// A client for `config`'s servers, keeping files in `cache`.
    pub fn with_cache(config: &DebuginfodConfig, cache: PathBuf) -> Result<Debuginfod> {
        let agent = ureq::AgentBuilder::new().timeout(config.timeout).build();
        let client = Client::builder()
            .http_client(Http(agent))
            .build(config.urls.iter().map(String::as_str))
            .map_err(|e| Error::Usage(format!("debuginfod: {e:#}")))?
            .ok_or_else(|| Error::Usage("debuginfod: no server given".into()))?;
        let client = CachingClient::new(client, &cache)
            .map_err(|e| Error::Usage(format!("debuginfod cache {}: {e:#}", cache.display())))?;
        Ok(Debuginfod {
            client,
            cache,
            urls: config.urls.join(" "),
            fetched: HashMap::new(),
            failed: None,
        })
    }

    /// The debug file of build-id `id` (hex), from the cache or the servers, or why not.
    pub fn debug_file(&mut self, id: &str) -> std::result::Result<PathBuf, String> {
        if let Some(known) = self.fetched.get(id) {
            return known.clone();
        }
        // What is cached is used even when the servers are gone.
        let cached = self.cache.join(id).join("debuginfo");
        let result = match &self.failed {
            _ if cached.is_file() => Ok(cached),
            Some(why) => Err(format!("not asked: {} failed before ({why})", self.urls)),
            None => match self.client.fetch_debug_info(&BuildId::formatted(id)) {
                Ok(Some(path)) => Ok(path),
                Ok(None) => Err(format!("not found on {}", self.urls)),
                Err(e) => {
                    // The innermost cause ("Connection refused", "timed out", an HTTP
                    // status): the layers above it repeat the URL.
                    let why = e.root_cause().to_string();
                    self.failed = Some(why.clone());
                    Err(format!("{} failed: {why}", self.urls))
                }
            },
        };
        // A proxy's page, a truncated transfer or a damaged cache entry is not the file:
        // said, and taken out of the cache so that the next run asks again.
        let result = result.and_then(|path| {
            let found = blazesym::helper::read_elf_build_id(&path).ok().flatten();
            if found.is_some_and(|found| hex(&found) == id) {
                return Ok(path);
            }
            let _ = std::fs::remove_file(&path);
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
            Err(format!(
                "{} sent a file that is not its debug file (not ELF, or another build-id)",
                self.urls
            ))
        });
        self.fetched.insert(id.to_string(), result.clone());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_come_from_the_flag_before_the_environment() {
        let flags = vec!["http://127.0.0.1:8002".to_string()];
        let config = DebuginfodConfig::from_flags_or_env(&flags)
            .unwrap()
            .unwrap();
        assert_eq!(config.urls, flags);
        for bad in ["127.0.0.1:8002", "ftp://x", "http://"] {
            let err = DebuginfodConfig::from_flags_or_env(&[bad.to_string()]).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    /// A server (a proxy, say) that answers 200 with something that is not the debug file:
    /// refused, not kept in the cache, and not asked again in the run.
    #[test]
    fn a_file_that_is_not_the_debug_file_is_refused() {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = s.read(&mut request);
            let body = "<html>captive portal</html>";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            String::from_utf8_lossy(&request).into_owned()
        });
        let cache = tempfile::tempdir().unwrap();
        let config = DebuginfodConfig {
            urls: vec![format!("http://127.0.0.1:{port}")],
            timeout: Duration::from_secs(10),
        };
        let mut d = Debuginfod::with_cache(&config, cache.path().to_path_buf()).unwrap();
        let id = "5daf3edf87a254db42d4f2c35284afa0766a5fbf";
        let why = d.debug_file(id).unwrap_err();
        assert!(why.contains("not its debug file"), "{why}");
        let request = server.join().unwrap();
        assert!(
            request.starts_with(&format!("GET /buildid/{id}/debuginfo ")),
            "{request}"
        );
        assert!(!cache.path().join(id).exists());
        // Said once for the run: no second request (nothing listens any more).
        assert_eq!(d.debug_file(id).unwrap_err(), why);
    }
}
