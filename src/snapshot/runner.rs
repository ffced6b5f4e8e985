//! The one way snapship runs `btrfs`, `zfs` and `zpool`.
//!
//! Every failure carries the command line and what the command wrote on stderr, so a log line
//! is enough to reproduce it by hand. Streaming commands read their stderr concurrently (a
//! full stderr pipe would otherwise stall the child) and keep only its tail.
//!
//! Every command runs in the C locale: callers classify failures by the English text on
//! stderr ("does not exist", "dataset is busy"), and a translated message would turn a case
//! they handle into an unexplained error.

use std::fmt;
use std::process::{ExitStatus, Stdio};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Bytes of stderr kept for error messages.
const STDERR_TAIL: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start `{cmdline}`: {source}")]
    Spawn { cmdline: String, source: std::io::Error },
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Failed { cmdline: String, status: String, stderr: String },
    /// It failed because a filesystem was full: the admin must free space (classified here,
    /// where the command's own words are known; commands run with `LC_ALL=C`).
    #[error("`{cmdline}` ran out of space ({status}): {stderr}")]
    NoSpace { cmdline: String, status: String, stderr: String },
}

/// What `btrfs` and `zfs` say when a filesystem or pool is full (English: `LC_ALL=C`).
const NO_SPACE: &[&str] = &["No space left on device", "out of space", "insufficient space"];

impl CommandError {
    /// A failure with `stderr`, told apart when it says the filesystem is full.
    fn exited(cmdline: String, status: String, stderr: String) -> CommandError {
        let stderr = if stderr.is_empty() { "no error output".into() } else { stderr };
        if NO_SPACE.iter().any(|m| stderr.contains(m)) {
            CommandError::NoSpace { cmdline, status, stderr }
        } else {
            CommandError::Failed { cmdline, status, stderr }
        }
    }
}

impl CommandError {
    /// What the command wrote on stderr, if it ran and failed.
    pub fn stderr(&self) -> &str {
        match self {
            CommandError::Failed { stderr, .. } | CommandError::NoSpace { stderr, .. } => stderr,
            CommandError::Spawn { .. } => "",
        }
    }
}

/// A command line, kept printable.
pub struct Cmd {
    program: String,
    args: Vec<String>,
}

impl Cmd {
    pub fn new(program: &str) -> Cmd {
        Cmd { program: program.to_string(), args: Vec::new() }
    }

    /// The arguments, for tests of command construction.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_string_lossy().into_owned());
        self
    }

    /// The process to start: in the C locale (see the module comment; `LC_ALL` overrides
    /// every `LC_*` and, for gettext, `LANGUAGE`), stdin and stdout closed unless a caller
    /// connects them, stderr captured.
    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).env("LC_ALL", "C").env("LANG", "C");
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        c
    }

    /// Runs to completion and returns stdout.
    pub async fn output(&self) -> Result<String, CommandError> {
        let mut c = self.command();
        c.stdout(Stdio::piped());
        let out = c.output().await.map_err(|source| CommandError::Spawn { cmdline: self.to_string(), source })?;
        if !out.status.success() {
            return Err(self.failed(out.status, &out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs to completion whatever the exit status; returns the status and both outputs
    /// (for commands whose usage text or error we read).
    pub async fn output_unchecked(&self) -> Result<(ExitStatus, String, String), CommandError> {
        let mut c = self.command();
        c.stdout(Stdio::piped());
        let out = c.output().await.map_err(|source| CommandError::Spawn { cmdline: self.to_string(), source })?;
        Ok((out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    /// Starts the command with stdout (`Pipe::Out`) or stdin (`Pipe::In`) connected to us.
    pub fn spawn(&self, pipe: Pipe) -> Result<Running, CommandError> {
        let mut c = self.command();
        match pipe {
            Pipe::Out => c.stdout(Stdio::piped()),
            Pipe::In => c.stdin(Stdio::piped()),
        };
        let mut child = c.spawn().map_err(|source| CommandError::Spawn { cmdline: self.to_string(), source })?;
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let stderr_task = tokio::spawn(async move {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            tail
        });
        Ok(Running { cmdline: self.to_string(), child, stderr_task })
    }

    fn failed(&self, status: ExitStatus, stderr: &[u8]) -> CommandError {
        let text = String::from_utf8_lossy(stderr).trim().to_string();
        CommandError::exited(self.to_string(), status.to_string(), text)
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for a in &self.args {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                write!(f, " '{}'", a.replace('\'', "'\\''"))?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

pub enum Pipe {
    In,
    Out,
}

/// A started command whose stdin or stdout we stream.
pub struct Running {
    cmdline: String,
    child: Child,
    stderr_task: JoinHandle<Vec<u8>>,
}

impl Running {
    pub fn stdout(&mut self) -> ChildStdout {
        self.child.stdout.take().expect("spawned with Pipe::Out")
    }

    pub fn stdin(&mut self) -> ChildStdin {
        self.child.stdin.take().expect("spawned with Pipe::In")
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the exit; a non-zero exit is an error with the stderr tail.
    pub async fn wait(mut self) -> Result<(), CommandError> {
        drop(self.child.stdin.take());
        let status = self.child.wait().await.map_err(|source| CommandError::Spawn { cmdline: self.cmdline.clone(), source })?;
        let stderr = self.stderr_task.await.unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&stderr).trim().to_string();
        Err(CommandError::exited(self.cmdline, status.to_string(), text))
    }

    /// Kills the command (used when the other end of the stream failed).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
        self.stderr_task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_names_command_and_stderr() {
        let err = Cmd::new("sh").arg("-c").arg("echo boom >&2; exit 3").output().await.unwrap_err().to_string();
        assert!(err.contains("sh -c 'echo boom >&2; exit 3'"), "{err}");
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
    }

    #[tokio::test]
    async fn commands_run_in_the_c_locale() {
        // Whatever the caller's locale, so that stderr is English for the classifiers.
        let out = Cmd::new("sh").arg("-c").arg("echo \"$LC_ALL $LANG\"").output().await.unwrap();
        assert_eq!(out, "C C\n");
        let mut run = Cmd::new("sh").arg("-c").arg("echo \"$LC_ALL $LANG\"").spawn(Pipe::Out).unwrap();
        let mut buf = String::new();
        run.stdout().read_to_string(&mut buf).await.unwrap();
        run.wait().await.unwrap();
        assert_eq!(buf, "C C\n");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = Cmd::new("/nonexistent/tool").output().await.unwrap_err().to_string();
        assert!(err.starts_with("cannot start `/nonexistent/tool`"), "{err}");
    }

    #[tokio::test]
    async fn streams_stdout_and_keeps_stderr_tail() {
        let mut run = Cmd::new("sh").arg("-c").arg("head -c 300000 /dev/zero; echo done >&2; exit 1").spawn(Pipe::Out).unwrap();
        let mut out = run.stdout();
        let mut buf = Vec::new();
        out.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf.len(), 300000);
        let err = run.wait().await.unwrap_err().to_string();
        assert!(err.contains("done"), "{err}");
    }
}
