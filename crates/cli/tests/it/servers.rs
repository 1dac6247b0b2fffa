//! HTTP servers started by the tests on 127.0.0.1: nginx (ranges, a redirect, a location
//! that needs a bearer token) and Python's http.server (which ignores ranges), with a
//! handler that fails its first requests with 503 to exercise retries.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed on drop.
pub(crate) struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub(crate) base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_ready(port: u16, child: &mut Child) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("server exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server on port {port} did not start");
}

/// nginx serving `root` at `/img/`, `/old/X` redirecting to `/img/X`, and `/auth/X`
/// serving `root` only with `Authorization: Bearer t0ken`.
pub(crate) fn nginx(root: &Path, work: &Path) -> Server {
    let port = free_port();
    let conf = work.join("nginx.conf");
    let r = root.display();
    let w = work.display();
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes 1; pid {w}/nginx.pid; error_log {w}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {w}/body; proxy_temp_path {w}/proxy; fastcgi_temp_path {w}/fcgi;
  uwsgi_temp_path {w}/uwsgi; scgi_temp_path {w}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location /img/ {{ alias {r}/; }}
    location /old/ {{ rewrite ^/old/(.*)$ /img/$1 redirect; }}
    location /auth/ {{
      if ($http_authorization != \"Bearer t0ken\") {{ return 403; }}
      alias {r}/;
    }}
  }}
}}
"
        ),
    )
    .unwrap();
    let mut child = Command::new("nginx")
        .args(["-c", conf.to_str().unwrap(), "-p", work.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx (install nginx-light)");
    wait_ready(port, &mut child);
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// Python's http.server over `root` (no range support); the first `fail_first` GET
/// requests are answered with 503.
pub(crate) fn python(root: &Path, fail_first: u32) -> Server {
    let port = free_port();
    let script = format!(
        "import http.server, functools
fails = [{fail_first}]
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if fails[0] > 0:
            fails[0] -= 1
            self.send_error(503)
            return
        super().do_GET()
h = functools.partial(H, directory={root:?})
http.server.ThreadingHTTPServer(('127.0.0.1', {port}), h).serve_forever()
",
        root = root.to_str().unwrap()
    );
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run python3");
    wait_ready(port, &mut child);
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}
