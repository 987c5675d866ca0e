//! Machines on one machine: every "host" of a test is a network namespace of its own with one
//! address on a bridge that lives in a further namespace (the hub) the test creates, so
//! processes talk over a real network (ARP, TCP, routes between hosts) and a nemesis can cut,
//! slow or drop traffic between any two hosts without touching the machine's own interfaces.
//!
//! - Addresses are `10.99.0.N/24`, private to the test: each test has its own hub, so tests in
//!   parallel may reuse them.
//! - A process is started on a host by forking from a thread that has entered the host's
//!   namespace ([`Net::spawn_on`]): the child has that network and nothing else changed (no
//!   wrapper, the pid is the process's own, `/sys` and cgroups stay as they are).
//! - The test's own sockets (clients, checks) are made on a host too: [`Net::enter`] moves the
//!   calling thread into a host's namespace, which on a current-thread tokio runtime is every
//!   socket the test makes.
//! - Faults ([`Net::cut`], [`Net::loss`], [`Net::slow`]) are nftables rules in the receiving
//!   host's `input` chain (packets vanish, as on a real partition: no reset, no error to the
//!   sender) and a token bucket (`tc tbf`) on its interface. The kernels here have no `netem`,
//!   so a slow link is a low rate with a deep queue rather than a fixed delay.
//!
//! Namespaces are removed on drop; ones left by a process that died are removed by the next
//! [`Net::create`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace this module makes: `ohn{pid}x{n}-{host}`.
const PREFIX: &str = "ohn";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Why hosts cannot be made here (not root, no `ip`, no namespaces), or `Ok`.
pub fn available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("network namespaces need root (CI runs as root)".to_owned());
    }
    for tool in ["ip", "nft", "tc"] {
        crate::proc::find_system_bin(tool, &[&format!("/usr/sbin/{tool}")])?;
    }
    let probe = format!(
        "{PREFIX}{}probe{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    run("ip", &["netns", "add", &probe], None)
        .map_err(|e| format!("cannot create a namespace: {e}"))?;
    let _ = run("ip", &["netns", "del", &probe], None);
    Ok(())
}

/// Runs a command (from the calling thread's namespace), with `stdin`; its stderr on failure.
fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let path = crate::proc::find_system_bin(bin, &[&format!("/usr/sbin/{bin}")])?;
    let mut child = Command::new(&path)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{bin}: writing its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{bin} {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Puts the calling thread back into the namespace it was in when dropped.
#[must_use = "the thread leaves the namespace when this is dropped"]
pub struct NsGuard {
    previous: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Err(e) =
            move_into_link_name_space(self.previous.as_fd(), Some(LinkNameSpaceType::Network))
        {
            // A thread stuck in a test host's namespace would make its next test wrong.
            panic!("cannot return to the previous network namespace: {e}");
        }
    }
}

/// Moves the calling thread into namespace `ns` until the guard drops.
fn enter_ns(ns: &str) -> NsGuard {
    let previous = File::open("/proc/thread-self/ns/net").expect("open this thread's namespace");
    let target = File::open(PathBuf::from(NETNS_DIR).join(ns))
        .unwrap_or_else(|e| panic!("open namespace {ns}: {e}"));
    move_into_link_name_space(target.as_fd(), Some(LinkNameSpaceType::Network))
        .unwrap_or_else(|e| panic!("enter namespace {ns}: {e}"));
    NsGuard { previous }
}

/// One test host.
#[derive(Debug, Clone)]
pub struct Host {
    /// The test's name for it (`n1`, `w2`, ...).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the test's bridge.
    pub addr: Ipv4Addr,
}

/// The faults in force, rendered into each host's rules.
#[derive(Debug, Default)]
struct Faults {
    /// `(from, to)`: packets from `from` to `to` are dropped.
    cuts: BTreeSet<(String, String)>,
    /// Percent of packets arriving at a host that are dropped.
    loss: BTreeMap<String, u8>,
}

/// A test's network: hosts on one bridge, and the faults between them.
#[derive(Debug)]
pub struct Net {
    hub: String,
    hosts: BTreeMap<String, Host>,
    faults: Mutex<Faults>,
}

impl Net {
    /// Creates the hub with its bridge and one namespace per `(name, last octet)`, each with
    /// `eth0` at `10.99.0.<octet>/24` and `lo` up, and an empty nftables table. Panics with the
    /// failing command if the machine refuses (check [`available`] first).
    pub fn create(hosts: &[(&str, u8)]) -> Net {
        remove_stale();
        let tag = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{tag}-hub");
        let mut net = Net {
            hub: hub.clone(),
            hosts: BTreeMap::new(),
            faults: Mutex::new(Faults::default()),
        };
        let must = |args: &[&str]| run("ip", args, None).unwrap_or_else(|e| panic!("{e}"));
        must(&["netns", "add", &hub]);
        must(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        must(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, (name, octet)) in hosts.iter().enumerate() {
            let ns = format!("{tag}-{name}");
            let port = format!("p{i}");
            let addr = Ipv4Addr::new(10, 99, 0, *octet);
            must(&["netns", "add", &ns]);
            net.hosts.insert(
                (*name).to_owned(),
                Host {
                    name: (*name).to_owned(),
                    ns: ns.clone(),
                    addr,
                },
            );
            must(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &hub,
            ]);
            must(&["-n", &hub, "link", "set", &port, "master", "br0"]);
            must(&["-n", &hub, "link", "set", &port, "up"]);
            must(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            must(&["-n", &ns, "link", "set", "eth0", "up"]);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let names: Vec<String> = net.hosts.keys().cloned().collect();
        for name in names {
            net.apply(&name).unwrap_or_else(|e| panic!("{e}"));
        }
        net
    }

    /// A host by name (panics on an unknown one: a test bug).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// A host's address.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.host(name).addr
    }

    /// Moves the calling thread onto host `name` until the guard drops: every socket it makes
    /// meanwhile is on that host (on a current-thread runtime, every socket of the test).
    pub fn enter(&self, name: &str) -> NsGuard {
        enter_ns(&self.host(name).ns)
    }

    /// Runs `f` on host `name` (e.g. a process spawn: the child starts there).
    pub fn on<T>(&self, name: &str, f: impl FnOnce() -> T) -> T {
        let _guard = self.enter(name);
        f()
    }

    /// Drops every packet from `from` to `to` (one way; TCP in both directions then stalls,
    /// but `to` can still reach `from` with packets that need no answer).
    pub fn cut(&self, from: &str, to: &str) {
        self.change(to, |f| {
            f.cuts.insert((from.to_owned(), to.to_owned()));
        });
    }

    /// Drops everything between `a` and `b`, both ways.
    pub fn cut_both(&self, a: &str, b: &str) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Cuts `name` from every other host, both ways.
    pub fn isolate(&self, name: &str) {
        let others: Vec<String> = self.hosts.keys().filter(|h| *h != name).cloned().collect();
        for o in others {
            self.cut_both(name, &o);
        }
    }

    /// Removes the cuts between `a` and `b` (both ways).
    pub fn heal(&self, a: &str, b: &str) {
        for (from, to) in [(a, b), (b, a)] {
            self.change(to, |f| {
                f.cuts.remove(&(from.to_owned(), to.to_owned()));
            });
        }
    }

    /// Removes every cut and every loss.
    pub fn heal_all(&self) {
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        {
            let mut f = self.faults.lock().expect("faults lock");
            f.cuts.clear();
            f.loss.clear();
        }
        for n in names {
            self.apply(&n).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Drops `percent` of the packets arriving at `name` (0 removes the loss).
    pub fn loss(&self, name: &str, percent: u8) {
        self.change(name, |f| {
            if percent == 0 {
                f.loss.remove(name);
            } else {
                f.loss.insert(name.to_owned(), percent.min(100));
            }
        });
    }

    /// Limits what `name` sends to `kbit` kbit/s with a queue of up to 2 s (a slow link: its
    /// packets wait in line), or removes the limit (`None`).
    pub fn slow(&self, name: &str, kbit: Option<u32>) {
        let ns = &self.host(name).ns;
        let r = match kbit {
            Some(k) => run(
                "tc",
                &[
                    "-n",
                    ns,
                    "qdisc",
                    "replace",
                    "dev",
                    "eth0",
                    "root",
                    "tbf",
                    "rate",
                    &format!("{k}kbit"),
                    "burst",
                    "16kb",
                    "latency",
                    "2s",
                ],
                None,
            ),
            None => run(
                "tc",
                &["-n", ns, "qdisc", "del", "dev", "eth0", "root"],
                None,
            ),
        };
        r.unwrap_or_else(|e| panic!("{e}"));
    }

    fn change(&self, host: &str, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().expect("faults lock"));
        self.apply(host).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Replaces host `name`'s rules with those of the faults in force, atomically.
    fn apply(&self, name: &str) -> Result<(), String> {
        let rules = {
            let f = self.faults.lock().expect("faults lock");
            let mut rules = String::new();
            let from: Vec<String> = f
                .cuts
                .iter()
                .filter(|(_, to)| to == name)
                .map(|(from, _)| self.addr(from).to_string())
                .collect();
            if !from.is_empty() {
                rules.push_str(&format!("    ip saddr {{ {} }} drop\n", from.join(", ")));
            }
            if let Some(p) = f.loss.get(name) {
                rules.push_str(&format!(
                    "    iifname \"eth0\" numgen random mod 100 < {p} drop\n"
                ));
            }
            rules
        };
        let script = format!(
            "table inet nemesis\ndelete table inet nemesis\ntable inet nemesis {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        self.on(name, || run("nft", &["-f", "-"], Some(&script)))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in self.hosts.values() {
            let _ = run("ip", &["netns", "del", &h.ns], None);
        }
        let _ = run("ip", &["netns", "del", &self.hub], None);
    }
}

/// Removes namespaces of ours whose process is gone (a test that was killed).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", &name], None);
        }
    }
}
