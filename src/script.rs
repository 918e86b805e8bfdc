//! Lua scripts run by `EVALSHA`, loaded through the configured (possibly renamed) command names.
//!
//! Production configs rename `EVAL` and `SCRIPT` (`rename-command EVAL EVAL_b835c3f9a8`). A
//! script is always tried by SHA first; on `NOSCRIPT` (after `SCRIPT FLUSH`, a restart or a
//! failover) it is sent once in full through the configured `EVAL` name, which also caches it,
//! so callers never see `NOSCRIPT`.

use redis::aio::ConnectionLike;
use redis::{Cmd, RedisWrite, ToRedisArgs, Value};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pool::{Connection, Redis};

/// A Lua script known by its source and SHA1.
#[derive(Debug, Clone)]
pub struct LuaScript {
    name: &'static str,
    source: &'static str,
    sha: String,
}

impl LuaScript {
    /// A script; `name` appears in errors and traces.
    pub fn new(name: &'static str, source: &'static str) -> Self {
        let sha = redis::Script::new(source).get_hash().to_owned();
        LuaScript { name, source, sha }
    }

    /// The SHA1 the server knows the script by.
    pub fn sha(&self) -> &str {
        &self.sha
    }

    /// The script's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Keys and arguments of one script call. Arguments are encoded when added, back to back in one
/// buffer, so that a call with many arguments allocates a few times rather than once per
/// argument. `Debug` shows only how many there are: keys carry session ids and arguments
/// carry token digests and job payloads.
#[derive(Clone, Default)]
pub struct ScriptCall {
    keys: Vec<String>,
    args: ArgBuffer,
}

impl std::fmt::Debug for ScriptCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptCall")
            .field("keys", &self.keys.len())
            .field("args", &self.args.starts.len())
            .finish()
    }
}

/// Encoded arguments: their bytes in one buffer and where each one starts.
#[derive(Clone, Default)]
struct ArgBuffer {
    bytes: Vec<u8>,
    starts: Vec<usize>,
}

impl ArgBuffer {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let ends = self
            .starts
            .iter()
            .skip(1)
            .copied()
            .chain(std::iter::once(self.bytes.len()));
        self.starts
            .iter()
            .zip(ends)
            .map(|(&start, end)| &self.bytes[start..end])
    }
}

impl RedisWrite for ArgBuffer {
    fn write_arg(&mut self, arg: &[u8]) {
        self.starts.push(self.bytes.len());
        self.bytes.extend_from_slice(arg);
    }

    fn writer_for_next_arg(&mut self) -> impl std::io::Write + '_ {
        self.starts.push(self.bytes.len());
        &mut self.bytes
    }
}

impl ScriptCall {
    /// An empty call.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key (`KEYS[n]`).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Adds an argument (`ARGV[n]`).
    pub fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn command(&self, name: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(name);
        cmd.arg(script).arg(self.keys.len()).arg(&self.keys);
        for arg in self.args.iter() {
            cmd.arg(arg);
        }
        cmd
    }
}

/// Sends script commands. The redis client routes a command name it does not know (a renamed
/// `EVALSHA` or `EVAL`) by its first argument, which for a script call is the SHA or the source:
/// on Cluster that lands on a random node, and the `MOVED` reply makes the client rebuild its
/// slot map. A sender that can route sends such a call to the node of its first key instead.
pub(crate) trait ScriptSender: Send {
    fn send<'a>(
        &'a mut self,
        cmd: Cmd,
        renamed: bool,
        first_key: Option<&'a str>,
    ) -> redis::RedisFuture<'a, Value>;
}

/// A connection that routes as the redis client does.
struct ClientRouted<'c, C>(&'c mut C);

impl<C: ConnectionLike + Send> ScriptSender for ClientRouted<'_, C> {
    fn send<'a>(
        &'a mut self,
        cmd: Cmd,
        _renamed: bool,
        _first_key: Option<&'a str>,
    ) -> redis::RedisFuture<'a, Value> {
        Box::pin(async move { cmd.query_async(&mut *self.0).await })
    }
}

impl ScriptSender for Connection {
    fn send<'a>(
        &'a mut self,
        cmd: Cmd,
        renamed: bool,
        first_key: Option<&'a str>,
    ) -> redis::RedisFuture<'a, Value> {
        let route_by = if renamed { first_key } else { None };
        match (self, route_by) {
            #[cfg(feature = "cluster")]
            (Connection::Cluster(c), Some(key)) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                // As `query_async` does: an error reply inside the value is the call's error.
                Box::pin(async move { c.route_command(cmd, routing).await?.extract_error() })
            }
            (conn, _) => Box::pin(async move { cmd.query_async(conn).await }),
        }
    }
}

/// The scripting command names in force.
#[derive(Debug, Clone)]
pub(crate) struct Scripts {
    evalsha: Option<String>,
    eval: Option<String>,
}

const PROBE: &str = "return 1";

impl Scripts {
    pub(crate) fn new(config: &Config) -> Self {
        Scripts {
            evalsha: config.command_name("EVALSHA").map(str::to_owned),
            eval: config.command_name("EVAL").map(str::to_owned),
        }
    }

    /// `script` by SHA, then, on `NOSCRIPT`, in full: on any connection, routed by the client.
    pub(crate) async fn run<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        script: &LuaScript,
        call: &ScriptCall,
    ) -> redis::RedisResult<Value> {
        self.run_on(&mut ClientRouted(conn), script, call).await
    }

    /// [`Scripts::run`] on a connection of this crate's: on Cluster, a call under a renamed name
    /// goes to the node of its first key.
    pub(crate) async fn run_on<S: ScriptSender>(
        &self,
        conn: &mut S,
        script: &LuaScript,
        call: &ScriptCall,
    ) -> redis::RedisResult<Value> {
        let first_key = call.keys.first().map(String::as_str);
        if let Some(evalsha) = &self.evalsha {
            let cmd = call.command(evalsha, &script.sha);
            match conn
                .send(cmd, !evalsha.eq_ignore_ascii_case("EVALSHA"), first_key)
                .await
            {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {}
                other => return other,
            }
        }
        match &self.eval {
            Some(eval) => {
                let cmd = call.command(eval, script.source);
                conn.send(cmd, !eval.eq_ignore_ascii_case("EVAL"), first_key)
                    .await
            }
            None => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "scripting disabled",
                "EVAL is renamed to the empty string".to_owned(),
            ))),
        }
    }

    /// Runs a trivial script through the configured `EVAL` name — the one `NOSCRIPT` recovery
    /// depends on — and then by SHA. `Ok(Err(why))`: scripting is unusable on this server;
    /// `Err`: the probe could not tell (a timeout, a broken connection, a busy, loading or
    /// paused server), and scripting must not be written off for the handle's lifetime.
    pub(crate) async fn probe(
        &self,
        conn: &mut Connection,
    ) -> redis::RedisResult<Result<(), String>> {
        // What a retry may cure (timeouts, broken connections, LOADING, TRYAGAIN, ..), and a
        // server busy running another script.
        let transient = |e: &redis::RedisError| {
            crate::Error::from_redis("probe", e.clone()).is_retryable() || e.code() == Some("BUSY")
        };
        match self.probe_once(conn).await {
            Err((e, _)) if transient(&e) => Err(e),
            Err((_, why)) => Ok(Err(why)),
            Ok(outcome) => Ok(outcome),
        }
    }

    async fn probe_once(
        &self,
        conn: &mut Connection,
    ) -> Result<Result<(), String>, (redis::RedisError, String)> {
        let probe = LuaScript::new("probe", PROBE);
        let call = ScriptCall::new();
        let names = format!(
            "{} / {}",
            self.eval.as_deref().unwrap_or("<disabled EVAL>"),
            self.evalsha.as_deref().unwrap_or("<disabled EVALSHA>"),
        );
        let Some(eval) = &self.eval else {
            return Ok(Err(format!("EVAL is disabled ({names})")));
        };
        let loaded: redis::RedisResult<Value> = call
            .command(eval, probe.source)
            .query_async(&mut *conn)
            .await;
        match loaded {
            Ok(Value::Int(1)) => {}
            Ok(other) => return Ok(Err(format!("unexpected probe reply {other:?}"))),
            Err(e) => {
                let why = format!("running a script with {names} failed: {e}");
                return Err((e, why));
            }
        }
        match self.run_on(conn, &probe, &call).await {
            Ok(Value::Int(1)) => Ok(Ok(())),
            Ok(other) => Ok(Err(format!("unexpected probe reply {other:?}"))),
            Err(e) => {
                let why = format!("running a script with {names} failed: {e}");
                Err((e, why))
            }
        }
    }
}

impl Redis {
    /// Fails with [`Error::Unsupported`] naming `feature` when scripts cannot run on this server
    /// under the configured command names. Repositories call it at construction.
    pub fn require_scripting(&self, feature: &str) -> Result<()> {
        let caps = self.capabilities();
        if caps.scripting {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{feature} needs Lua scripting: {}; set REDIS_RENAMED_COMMANDS to the server's \
                 names for EVAL/EVALSHA, or choose a script-free mode",
                caps.scripting_error.as_deref().unwrap_or("unavailable")
            )))
        }
    }

    /// Runs `script` atomically: one round trip (`EVALSHA`), two after a script cache flush
    /// (`EVALSHA`, then the full script through the configured `EVAL` name). On Cluster the
    /// call goes to the node of its first key, also under renamed command names.
    pub async fn eval_script(&self, script: &LuaScript, call: &ScriptCall) -> Result<Value> {
        let mut conn = self.connection().await?;
        self.scripts()
            .run_on(&mut conn, script, call)
            .await
            .map_err(|e| self.fail(script.name(), e))
    }

    /// [`Redis::eval_script`] on a connection of the caller's (e.g. a dedicated one). The
    /// connection routes the call: a Cluster connection of the redis client's own routes a
    /// renamed `EVALSHA` by the SHA, not by the first key (each `MOVED` that earns rebuilds its
    /// slot map), so on Cluster under renamed names use [`Redis::eval_script`].
    pub async fn eval_script_on<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        script: &LuaScript,
        call: &ScriptCall,
    ) -> Result<Value> {
        self.scripts()
            .run(conn, script, call)
            .await
            .map_err(|e| self.fail(script.name(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_keep_their_boundaries_and_order() {
        let call = ScriptCall::new()
            .key("k1")
            .arg(42)
            .arg("")
            .arg(&["a", "bc"][..])
            .arg(-7i64)
            .arg(b"raw".as_slice());
        let args: Vec<&[u8]> = call.args.iter().collect();
        let expected: [&[u8]; 6] = [b"42", b"", b"a", b"bc", b"-7", b"raw"];
        assert_eq!(args, expected);
        let packed = call.command("EVALSHA", "abc").get_packed_command();
        let expected = redis::cmd("EVALSHA")
            .arg("abc")
            .arg(1)
            .arg("k1")
            .arg(42)
            .arg("")
            .arg("a")
            .arg("bc")
            .arg(-7i64)
            .arg(b"raw".as_slice())
            .get_packed_command();
        assert_eq!(packed, expected);
        assert_eq!(ScriptCall::new().args.iter().count(), 0);
        // Debug names no key and no argument.
        let shown = format!("{call:?}");
        assert_eq!(shown, "ScriptCall { keys: 1, args: 6 }");
    }
}
