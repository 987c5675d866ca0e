//! `oh-sandbox-net <listen address> <unix socket>`: runs inside a session's sandbox (network
//! mode `egress`) and passes every TCP connection to its listen address (the sandbox's own
//! `127.0.0.1:3128`) to the worker's egress proxy on the Unix socket bound into the sandbox.
//! Threads and the standard library only: it costs the sandbox well under a MiB.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(socket), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: oh-sandbox-net <listen address> <unix socket>");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("oh-sandbox-net: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let socket = socket.clone();
        thread::spawn(move || {
            if let Ok(unix) = UnixStream::connect(&socket) {
                let _ = pipe(tcp, unix); // a broken connection only ends itself
            }
        });
    }
}

/// Copies both ways until each side has finished sending.
fn pipe(tcp: TcpStream, unix: UnixStream) -> io::Result<()> {
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(Shutdown::Write);
    });
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    let _ = io::copy(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
