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
use crate::pool::Redis;

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

    pub(crate) async fn run<C: ConnectionLike>(
        &self,
        conn: &mut C,
        script: &LuaScript,
        call: &ScriptCall,
    ) -> redis::RedisResult<Value> {
        if let Some(evalsha) = &self.evalsha {
            match call.command(evalsha, &script.sha).query_async(conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {}
                other => return other,
            }
        }
        match &self.eval {
            Some(eval) => call.command(eval, script.source).query_async(conn).await,
            None => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "scripting disabled",
                "EVAL is renamed to the empty string".to_owned(),
            ))),
        }
    }

    /// Runs a trivial script through the configured `EVAL` name — the one `NOSCRIPT` recovery
    /// depends on — and then by SHA; the error says why scripting is unusable.
    pub(crate) async fn probe<C: ConnectionLike>(&self, conn: &mut C) -> Result<(), String> {
        let probe = LuaScript::new("probe", PROBE);
        let call = ScriptCall::new();
        let names = format!(
            "{} / {}",
            self.eval.as_deref().unwrap_or("<disabled EVAL>"),
            self.evalsha.as_deref().unwrap_or("<disabled EVALSHA>"),
        );
        let Some(eval) = &self.eval else {
            return Err(format!("EVAL is disabled ({names})"));
        };
        let loaded: redis::RedisResult<Value> =
            call.command(eval, probe.source).query_async(conn).await;
        match loaded {
            Ok(Value::Int(1)) => {}
            Ok(other) => return Err(format!("unexpected probe reply {other:?}")),
            Err(e) => return Err(format!("running a script with {names} failed: {e}")),
        }
        match self.run(conn, &probe, &call).await {
            Ok(Value::Int(1)) => Ok(()),
            Ok(other) => Err(format!("unexpected probe reply {other:?}")),
            Err(e) => Err(format!("running a script with {names} failed: {e}")),
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
    /// (`EVALSHA`, then the full script through the configured `EVAL` name).
    pub async fn eval_script(&self, script: &LuaScript, call: &ScriptCall) -> Result<Value> {
        let mut conn = self.connection().await?;
        self.scripts()
            .run(&mut conn, script, call)
            .await
            .map_err(|e| self.fail(script.name(), e))
    }

    /// [`Redis::eval_script`] on a connection of the caller's (e.g. a dedicated one).
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
