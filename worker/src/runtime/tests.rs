//! Runtime tests against a real bash, each in its own temporary workspace root.

use std::time::Duration;

use shared::id::SessionId;
use tempfile::TempDir;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::TRUNCATION_MARKER;
use super::process::is_alive;
use super::*;

/// Generous bound for things that should take milliseconds, on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(30);

async fn start_with(tmp: &TempDir, tune: impl FnOnce(&mut RuntimeConfig)) -> Runtime {
    let mut cfg = RuntimeConfig::new(tmp.path().to_owned());
    tune(&mut cfg);
    let session = SessionId::parse("sess-1").expect("valid id");
    Runtime::start(&cfg, &session)
        .await
        .expect("runtime starts")
}

async fn start(tmp: &TempDir) -> Runtime {
    start_with(tmp, |_| {}).await
}

fn req(command: &str, timeout: Option<Duration>) -> CmdRequest {
    CmdRequest {
        command: command.to_owned(),
        is_input: false,
        timeout,
    }
}

/// Runs a command that is expected to finish.
async fn run(rt: &mut Runtime, command: &str) -> CmdOutput {
    rt.run(&req(command, Some(SLOW)), &CancellationToken::new())
        .await
        .expect("run")
}

async fn run_for(rt: &mut Runtime, command: &str, secs: f64) -> CmdOutput {
    let timeout = Some(Duration::from_secs_f64(secs));
    rt.run(&req(command, timeout), &CancellationToken::new())
        .await
        .expect("run")
}

async fn input(rt: &mut Runtime, text: &str, secs: f64) -> CmdOutput {
    let r = CmdRequest {
        command: text.to_owned(),
        is_input: true,
        timeout: Some(Duration::from_secs_f64(secs)),
    };
    rt.run(&r, &CancellationToken::new()).await.expect("input")
}

async fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + SLOW;
    loop {
        if let Ok(text) = tokio::fs::read_to_string(path).await
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while is_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test]
async fn workspaces_are_private_to_the_worker() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new().expect("tempdir");
    let root = tmp.path().join("workspaces");
    std::fs::create_dir(&root).expect("root");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cfg = RuntimeConfig::new(root.clone());
    let session = SessionId::parse("sess-1").expect("valid id");
    let rt = Runtime::start(&cfg, &session)
        .await
        .expect("runtime starts");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700, "the root is tightened");
    assert_eq!(mode(rt.workspace()), 0o700);
}

#[tokio::test]
async fn echo_into_file_then_cat_gives_hi_and_exit_code_0() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run(&mut rt, "echo hi > f && cat f").await;
    assert_eq!(o.content, "hi");
    assert_eq!(o.exit_code, 0);
    assert!(!o.still_running && !o.timed_out);
    assert_eq!(o.cwd, rt.workspace().display().to_string());
    assert_eq!(o.suffix, "\n[The command completed with exit code 0.]");
    assert!(o.pid > 0);
    assert!(rt.workspace().join("f").is_file());
    assert!(
        rt.workspace()
            .starts_with(tmp.path().canonicalize().expect("canon"))
    );
    rt.close().await;
}

#[tokio::test]
async fn cwd_environment_and_functions_persist_between_commands() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run(
        &mut rt,
        "mkdir -p sub && cd sub && export X=1 && declare Y=2 && f() { echo fn; }",
    )
    .await;
    assert_eq!(o.exit_code, 0, "{o:?}");
    let sub = rt.workspace().join("sub").display().to_string();
    assert_eq!(o.cwd, sub);
    let o = run(&mut rt, "pwd; echo $X $Y; f").await;
    assert_eq!(o.content, format!("{sub}\n1 2\nfn"));
    assert_eq!(o.cwd, sub);
}

#[tokio::test]
async fn exit_codes_and_stderr_are_reported() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    assert_eq!(run(&mut rt, "false").await.exit_code, 1);
    let o = run(&mut rt, "echo err >&2; (exit 7)").await;
    assert_eq!((o.content.as_str(), o.exit_code), ("err", 7));
    let o = run(&mut rt, "no-such-command-xyz").await;
    assert_eq!(o.exit_code, 127);
    assert!(o.content.contains("command not found"), "{o:?}");
}

#[tokio::test]
async fn the_shell_starts_with_a_clean_environment() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    // cargo sets CARGO_PKG_NAME for this test process; the shell must not inherit it.
    let o = run(
        &mut rt,
        "echo $HOME; echo ${CARGO_PKG_NAME:-unset}; cd; pwd",
    )
    .await;
    let ws = rt.workspace().display().to_string();
    assert_eq!(o.content, format!("{ws}\nunset\n{ws}"));
}

#[tokio::test]
async fn any_text_keeps_the_protocol_working() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run(&mut rt, "for i in 1 2; do\n  echo $i\ndone").await;
    assert_eq!((o.content.as_str(), o.exit_code), ("1\n2", 0));
    let o = run(&mut rt, "echo \"unterminated").await;
    assert_eq!(o.exit_code, 2, "{o:?}");
    let o = run(&mut rt, "cat <<'EOF'\na 'b' \"c\"\nEOF").await;
    assert_eq!(o.content, "a 'b' \"c\"");
    let o = run(&mut rt, "echo __OH_DONE_x_1__ 0 /; printf 'no newline'").await;
    assert_eq!(o.content, "__OH_DONE_x_1__ 0 /\nno newline");
    let o = run(&mut rt, "return 4").await;
    assert_eq!(o.exit_code, 4);
    let o = run(&mut rt, "echo ok").await;
    assert_eq!((o.content.as_str(), o.exit_code), ("ok", 0));
}

#[tokio::test]
async fn shell_exit_is_reported_and_the_next_command_gets_a_new_shell_in_the_same_cwd() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    run(&mut rt, "mkdir d && cd d && export Z=1").await;
    let o = run(&mut rt, "echo bye; exit 3").await;
    assert_eq!((o.content.as_str(), o.exit_code), ("bye", 3));
    assert!(o.suffix.contains("The shell exited with code 3"), "{o:?}");
    let o = run(&mut rt, "pwd; echo \"z=$Z\"").await;
    let d = rt.workspace().join("d").display().to_string();
    assert_eq!(o.content, format!("{d}\nz="));
}

#[tokio::test]
async fn a_timed_out_command_keeps_running_and_can_be_waited_for() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run_for(&mut rt, "echo start; sleep 2; echo end", 0.5).await;
    assert_eq!(o.content, "start");
    assert!(o.still_running && o.timed_out, "{o:?}");
    assert_eq!(o.exit_code, -1);
    assert!(o.suffix.contains("timed out after 0.5 seconds"), "{o:?}");

    let o = run(&mut rt, "echo new").await;
    assert!(o.suffix.contains("\"echo new\" is NOT executed"), "{o:?}");
    assert!(o.still_running && !o.timed_out);

    let o = input(&mut rt, "", 30.0).await;
    assert_eq!((o.content.as_str(), o.exit_code), ("end", 0));
    assert_eq!(o.prefix, CONTINUE_PREFIX);
    assert!(!o.still_running);
    assert_eq!(run(&mut rt, "echo next").await.content, "next");
}

#[tokio::test]
async fn a_command_that_finished_meanwhile_lets_the_next_one_run() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run_for(&mut rt, "sleep 0.3; echo first", 0.05).await;
    assert!(o.still_running);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let o = run(&mut rt, "echo second").await;
    assert_eq!((o.content.as_str(), o.exit_code), ("first\nsecond", 0));
}

#[tokio::test]
async fn no_output_for_a_while_returns_the_command_as_still_running() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start_with(&tmp, |c| c.no_change_timeout = Duration::from_millis(500)).await;
    run(&mut rt, "export KEEP=yes").await;
    let started = Instant::now();
    let o = rt
        .run(&req("echo a; sleep 30", None), &CancellationToken::new())
        .await
        .expect("run");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(o.content, "a");
    assert!(o.still_running && o.timed_out);
    assert!(
        o.suffix.contains("no new output after 0.5 seconds"),
        "{o:?}"
    );

    let o = input(&mut rt, "C-c", 30.0).await;
    assert_eq!(o.exit_code, 130, "{o:?}");
    assert!(o.suffix.contains("CTRL+C was sent"), "{o:?}");
    assert_eq!(run(&mut rt, "echo $KEEP").await.content, "yes");
}

#[tokio::test]
async fn ctrl_c_aborts_builtin_loops_and_the_rest_of_the_command() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run_for(
        &mut rt,
        "export K=1; while true; do :; done; echo after",
        0.3,
    )
    .await;
    assert!(o.still_running);
    let o = input(&mut rt, "C-c", 30.0).await;
    assert_eq!((o.content.as_str(), o.exit_code), ("", 130), "{o:?}");
    assert_eq!(run(&mut rt, "echo $K").await.content, "1");
}

#[tokio::test]
async fn ctrl_c_that_is_ignored_kills_the_shell() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    run(&mut rt, "mkdir w && cd w").await;
    let o = run_for(
        &mut rt,
        "trap '' INT; sh -c 'echo $$ > ../fg.pid; exec sleep 30'",
        0.3,
    )
    .await;
    assert!(o.still_running);
    let pid = read_pid(&rt.workspace().join("fg.pid")).await;
    let o = input(&mut rt, "C-c", 30.0).await;
    assert!(!o.still_running && o.exit_code == -1, "{o:?}");
    assert!(o.suffix.contains("did not stop after CTRL+C"), "{o:?}");
    assert!(gone_within(pid, Duration::from_secs(2)).await);
    let o = run(&mut rt, "pwd").await;
    assert_eq!(o.content, rt.workspace().join("w").display().to_string());
}

#[tokio::test]
async fn input_reaches_the_running_command_and_c_d_ends_it() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run_for(&mut rt, "read -r x; echo \"got $x\"", 0.3).await;
    assert!(o.still_running);
    let o = input(&mut rt, "hello world", 30.0).await;
    assert_eq!((o.content.as_str(), o.exit_code), ("got hello world", 0));

    let o = run_for(&mut rt, "cat", 0.3).await;
    assert!(o.still_running);
    let o = input(&mut rt, "abc", 0.5).await;
    assert_eq!(o.content, "abc");
    assert!(o.still_running);
    let o = input(&mut rt, "C-d", 30.0).await;
    assert_eq!((o.content.as_str(), o.exit_code), ("", 0), "{o:?}");
    let o = run_for(&mut rt, "cat", 0.3).await;
    assert!(o.still_running);
    let o = input(&mut rt, "C-z", 30.0).await;
    assert!(
        o.suffix.contains("not supported") && o.still_running,
        "{o:?}"
    );
    assert_eq!(input(&mut rt, "C-c", 30.0).await.exit_code, 130);
}

#[tokio::test]
async fn input_without_a_running_command_is_explained() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = input(&mut rt, "y", 1.0).await;
    assert_eq!(
        o.content,
        "ERROR: No previous running command to interact with."
    );
    let o = run(&mut rt, "  ").await;
    assert_eq!(
        o.content,
        "ERROR: No previous running command to retrieve logs from."
    );
}

#[tokio::test]
async fn background_output_is_shown_with_the_next_command() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = run(&mut rt, "(sleep 0.3; echo late) &").await;
    assert_eq!(o.exit_code, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let o = run(&mut rt, "echo now").await;
    assert_eq!(o.content, "late\nnow");
}

#[tokio::test]
async fn cancel_stops_the_command_within_a_second_and_keeps_the_shell() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    run(&mut rt, "export KEEP=1").await;
    let pid_file = rt.workspace().join("fg.pid");
    let cancel = CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let pid = read_pid(&pid_file).await;
            cancel.cancel();
            (pid, Instant::now())
        })
    };
    let res = rt
        .run(
            &req("sh -c 'echo $$ > fg.pid; exec sleep 30'", None),
            &cancel,
        )
        .await;
    let returned = Instant::now();
    let (pid, fired) = canceller.await.expect("canceller");
    assert!(matches!(res, Err(RuntimeError::Cancelled)), "{res:?}");
    assert!(
        returned - fired < Duration::from_secs(1),
        "{:?}",
        returned - fired
    );
    assert!(gone_within(pid, Duration::from_secs(1) - (returned - fired)).await);
    assert_eq!(run(&mut rt, "echo $KEEP").await.content, "1");
}

#[tokio::test]
async fn cancel_of_a_command_ignoring_sigint_kills_the_shell_within_a_second() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    run(&mut rt, "mkdir w && cd w").await;
    let pid_file = rt.workspace().join("fg.pid");
    let cancel = CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let pid = read_pid(&pid_file).await;
            cancel.cancel();
            (pid, Instant::now())
        })
    };
    let cmd = "trap '' INT; sh -c 'echo $$ > ../fg.pid; exec sleep 30'";
    let res = rt.run(&req(cmd, None), &cancel).await;
    let returned = Instant::now();
    let (pid, fired) = canceller.await.expect("canceller");
    assert!(matches!(res, Err(RuntimeError::Cancelled)), "{res:?}");
    assert!(
        returned - fired < Duration::from_secs(1),
        "{:?}",
        returned - fired
    );
    assert!(!is_alive(pid));
    let o = run(&mut rt, "pwd").await;
    assert_eq!(o.content, rt.workspace().join("w").display().to_string());
}

/// Starts a background `sleep`, a `setsid` one, and a foreground `sleep` left running;
/// returns their pids and the shell's.
async fn leave_processes(rt: &mut Runtime) -> Vec<i32> {
    let o = run(rt, "sleep 1000 & echo $!; setsid sleep 1000 & echo $!").await;
    let mut pids: Vec<i32> = o.content.lines().map(|l| l.parse().expect("pid")).collect();
    let o = run_for(rt, "sh -c 'echo $$ > fg.pid; exec sleep 30'", 0.3).await;
    assert!(o.still_running);
    pids.push(read_pid(&rt.workspace().join("fg.pid")).await);
    pids.push(i32::try_from(o.pid).expect("pid"));
    for &pid in &pids {
        assert!(is_alive(pid), "{pid} runs before close");
    }
    pids
}

#[tokio::test]
async fn close_kills_every_process_of_the_session() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let pids = leave_processes(&mut rt).await;
    rt.close().await;
    for pid in pids {
        assert!(!is_alive(pid), "{pid} survived close");
    }
    rt.close().await;
    let res = rt.run(&req("echo", None), &CancellationToken::new()).await;
    assert!(matches!(res, Err(RuntimeError::Closed)), "{res:?}");
}

#[tokio::test]
async fn drop_kills_every_process_of_the_session() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let pids = leave_processes(&mut rt).await;
    drop(rt);
    for pid in pids {
        assert!(
            gone_within(pid, Duration::from_secs(5)).await,
            "{pid} survived drop"
        );
    }
}

#[tokio::test]
async fn output_is_truncated_in_the_middle_and_made_valid_utf8() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start_with(&tmp, |c| c.max_output_chars = 1_000).await;
    let o = run(&mut rt, "seq 1 100000").await;
    assert!(o.content.starts_with("1\n2\n3\n"), "{}", &o.content[..20]);
    assert!(o.content.ends_with("99999\n100000"));
    assert!(o.content.contains(TRUNCATION_MARKER));
    assert_eq!(
        o.content.chars().count(),
        1_000 + TRUNCATION_MARKER.chars().count()
    );
    let o = run(
        &mut rt,
        "head -c 20000000 /dev/zero | tr '\\0' a; echo; echo end",
    )
    .await;
    assert!(o.content.ends_with("aaa\nend"));
    assert_eq!(o.exit_code, 0);
    let o = run(&mut rt, "printf 'ok \\xff\\xfe\\n'").await;
    assert_eq!(o.content, "ok \u{FFFD}\u{FFFD}");
}

#[tokio::test]
async fn edits_go_through_the_runtime_and_are_confined() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let create = EditCommand::Create {
        path: "a.txt".into(),
        file_text: "x\n".into(),
    };
    let o = rt.edit(&create).await.expect("create");
    assert_eq!(o.path, rt.workspace().join("a.txt").display().to_string());
    assert_eq!(run(&mut rt, "cat a.txt").await.content, "x");
    let outside = EditCommand::View {
        path: "/etc/passwd".into(),
        view_range: None,
    };
    let err = rt.edit(&outside).await.expect_err("outside");
    assert!(matches!(err, EditError::OutsideWorkspace { .. }), "{err}");
}

#[tokio::test]
async fn a_dropped_run_leaves_the_command_running() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let cmd = req("echo a; sleep 1; echo b", None);
    let never = CancellationToken::new();
    let dropped = tokio::time::timeout(Duration::from_millis(300), rt.run(&cmd, &never)).await;
    assert!(dropped.is_err(), "{dropped:?}");
    let o = input(&mut rt, "", 30.0).await;
    assert!(o.content.ends_with('b'), "{o:?}");
    assert_eq!(o.exit_code, 0);
}

#[tokio::test]
async fn an_absurd_timeout_is_just_long() {
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp).await;
    let o = rt
        .run(
            &req("echo x", Some(Duration::MAX)),
            &CancellationToken::new(),
        )
        .await
        .expect("run");
    assert_eq!(o.content, "x");
}
