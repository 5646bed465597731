//! Puts an instance's artifact into its working directory: a local path
//! under one of the daemon's artifact roots, or an `http://` URL starting
//! with one of its allowed prefixes. Archives (`.tar`, `.tar.gz`, `.tgz`)
//! are unpacked with the host's `tar`; a directory is copied; any other file
//! is copied as is, keeping its mode.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::api::Artifact;
use crate::http::Url;

/// Why an artifact could not be installed; `field` names the request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ArtifactError {
    /// `artifact.path` or `artifact.url`.
    pub field: &'static str,
    /// What went wrong.
    pub message: String,
    /// Whether the request was at fault (else the host was).
    pub bad_request: bool,
}

fn bad(field: &'static str, message: String) -> ArtifactError {
    ArtifactError {
        field,
        message,
        bad_request: true,
    }
}

fn host_error(field: &'static str, message: String) -> ArtifactError {
    ArtifactError {
        field,
        message,
        bad_request: false,
    }
}

/// Checks where the artifact comes from without touching the working
/// directory: the local path, canonical, under a root; or an allowed URL.
pub fn check(
    artifact: &Artifact,
    roots: &[PathBuf],
    allowed_urls: &[String],
) -> Result<(), ArtifactError> {
    match artifact {
        Artifact::Path(path) => local_path(path, roots).map(|_| ()),
        Artifact::Url(url) => allowed_url(url, allowed_urls).map(|_| ()),
    }
}

fn local_path(path: &str, roots: &[PathBuf]) -> Result<PathBuf, ArtifactError> {
    const F: &str = "artifact.path";
    if !Path::new(path).is_absolute() {
        return Err(bad(
            F,
            format!("artifact.path `{path}` must be an absolute path"),
        ));
    }
    let real = std::fs::canonicalize(path)
        .map_err(|e| bad(F, format!("artifact.path `{path}` cannot be used: {e}")))?;
    let inside = roots
        .iter()
        .any(|root| std::fs::canonicalize(root).is_ok_and(|root| real.starts_with(root)));
    if !inside {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(bad(
            F,
            if list.is_empty() {
                format!(
                    "artifact.path `{path}` is not allowed: this host has no artifact roots (start the daemon with --artifact-root)"
                )
            } else {
                format!(
                    "artifact.path `{path}` is outside the host's artifact roots ({})",
                    list.join(", ")
                )
            },
        ));
    }
    Ok(real)
}

fn allowed_url(url: &str, allowed: &[String]) -> Result<Url, ArtifactError> {
    const F: &str = "artifact.url";
    let parsed = Url::parse(url).map_err(|e| bad(F, format!("artifact.url: {e}")))?;
    let path = parsed
        .base_path
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    if !path_is_plain(path) {
        return Err(bad(
            F,
            format!(
                "artifact.url `{url}` has a `.`, `..` or encoded separator in its path; name the file directly"
            ),
        ));
    }
    if !allowed
        .iter()
        .any(|prefix| url_is_under(&parsed, path, prefix))
    {
        return Err(bad(
            F,
            if allowed.is_empty() {
                format!(
                    "artifact.url `{url}` is not allowed: this host allows no artifact URLs (start the daemon with --allow-url)"
                )
            } else {
                format!(
                    "artifact.url `{url}` does not start with an allowed prefix ({})",
                    allowed.join(", ")
                )
            },
        ));
    }
    Ok(parsed)
}

/// Whether a URL path has no segment a server could resolve upwards
/// (`.`, `..`, percent-encoded dots) and no encoded or backslash separator.
fn path_is_plain(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return false;
    }
    lower
        .split('/')
        .map(|segment| segment.replace("%2e", "."))
        .all(|segment| segment != "." && segment != "..")
}

/// Whether `url` (with its path without query) lies under the allowed
/// `prefix`: the same host and port, compared whole, not as text, and a path
/// equal to the prefix's or below it at a `/`. So
/// `http://allowed.example.com.evil/` is not under `http://allowed.example.com`,
/// and `/releases-old/x` is not under `/releases`.
fn url_is_under(url: &Url, path: &str, prefix: &str) -> bool {
    let Ok(prefix) = Url::parse(prefix) else {
        return false;
    };
    let base = prefix
        .base_path
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    url.host.eq_ignore_ascii_case(&prefix.host)
        && url.port == prefix.port
        && (base.is_empty()
            || path == base
            || path
                .strip_prefix(base)
                .is_some_and(|rest| rest.starts_with('/')))
}

/// Installs `artifact` into `working_dir` (created); `scratch` holds
/// downloads.
pub fn install(
    artifact: &Artifact,
    roots: &[PathBuf],
    allowed_urls: &[String],
    working_dir: &Path,
    scratch: &Path,
) -> Result<(), ArtifactError> {
    let field = match artifact {
        Artifact::Path(_) => "artifact.path",
        Artifact::Url(_) => "artifact.url",
    };
    std::fs::create_dir_all(working_dir).map_err(|e| {
        host_error(
            field,
            format!("cannot create {}: {e}", working_dir.display()),
        )
    })?;
    let (source, name) = match artifact {
        Artifact::Path(path) => {
            let real = local_path(path, roots)?;
            if real.is_dir() {
                return copy_tree(&real, working_dir, &canonical_roots(roots));
            }
            let name = file_name(&real.display().to_string());
            (real, name)
        }
        Artifact::Url(url) => {
            let parsed = allowed_url(url, allowed_urls)?;
            std::fs::create_dir_all(scratch).map_err(|e| {
                host_error(field, format!("cannot create {}: {e}", scratch.display()))
            })?;
            let name = file_name(url.split(['?', '#']).next().unwrap_or(url));
            let target = scratch.join(&name);
            download(&parsed, url, &target, MAX_DOWNLOAD_BYTES)?;
            (target, name)
        }
    };
    if [".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|s| name.ends_with(s))
    {
        // Unpacked aside first: a symlink out of the tree would let this
        // archive, or the next one unpacked over it, write or read outside.
        let aside = scratch.join("unpacked");
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::create_dir_all(&aside)
            .map_err(|e| host_error(field, format!("cannot create {}: {e}", aside.display())))?;
        untar(&source, &aside, field, &name)?;
        let checked = symlinks_stay_inside(&aside, &aside)
            .map_err(|message| bad(field, format!("{field}: `{name}` {message}")));
        let _ = std::fs::remove_dir_all(&aside);
        checked?;
        return untar(&source, working_dir, field, &name);
    }
    std::fs::copy(&source, working_dir.join(&name))
        .map(|_| ())
        .map_err(|e| host_error(field, format!("cannot copy {}: {e}", source.display())))
}

fn untar(source: &Path, into: &Path, field: &'static str, name: &str) -> Result<(), ArtifactError> {
    let out = Command::new("tar")
        .arg("-xf")
        .arg(source)
        .arg("-C")
        .arg(into)
        .output()
        .map_err(|e| host_error(field, format!("cannot run tar: {e}")))?;
    if !out.status.success() {
        return Err(bad(
            field,
            format!(
                "{field}: `{name}` is not a valid archive: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Checks that every symlink under `dir` points inside `top`, by its text:
/// relative, and never climbing above `top`.
fn symlinks_stay_inside(top: &Path, dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot be read: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot be read: {e}"))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| format!("cannot be read: {e}"))?;
        if kind.is_dir() {
            symlinks_stay_inside(top, &path)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| format!("cannot be read: {e}"))?;
            let inside = path.strip_prefix(top).ok().and_then(Path::parent);
            let mut depth = inside.map_or(0, |p| p.components().count()) as i64;
            let mut escapes = target.is_absolute();
            for c in target.components() {
                match c {
                    std::path::Component::ParentDir => depth -= 1,
                    std::path::Component::Normal(_) => depth += 1,
                    _ => {}
                }
                escapes |= depth < 0;
            }
            if escapes {
                let shown = path.strip_prefix(top).unwrap_or(&path);
                return Err(format!(
                    "has a symlink `{}` -> `{}` that points outside the archive",
                    shown.display(),
                    target.display()
                ));
            }
        }
    }
    Ok(())
}

fn canonical_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect()
}

fn file_name(path: &str) -> String {
    path.rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("artifact")
        .to_string()
}

/// Copies a directory artifact. A symlink in it is copied as the file it
/// names, and only when that file is under an artifact root: the root
/// bounds what the daemon reads, not just where the walk starts.
fn copy_tree(from: &Path, to: &Path, roots: &[PathBuf]) -> Result<(), ArtifactError> {
    const F: &str = "artifact.path";
    let entries = std::fs::read_dir(from)
        .map_err(|e| host_error(F, format!("cannot read {}: {e}", from.display())))?;
    std::fs::create_dir_all(to)
        .map_err(|e| host_error(F, format!("cannot create {}: {e}", to.display())))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| host_error(F, format!("cannot read {}: {e}", from.display())))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry
            .file_type()
            .map_err(|e| host_error(F, format!("cannot read {}: {e}", src.display())))?;
        if kind.is_dir() {
            copy_tree(&src, &dst, roots)?;
            continue;
        }
        if kind.is_symlink() {
            let real = std::fs::canonicalize(&src).ok();
            if !real
                .as_ref()
                .is_some_and(|r| r.is_file() && roots.iter().any(|root| r.starts_with(root)))
            {
                return Err(bad(
                    F,
                    format!(
                        "artifact.path: the symlink {} does not name a file under the host's artifact roots",
                        src.display()
                    ),
                ));
            }
        }
        std::fs::copy(&src, &dst).map_err(|e| {
            host_error(
                F,
                format!("cannot copy {} to {}: {e}", src.display(), dst.display()),
            )
        })?;
    }
    Ok(())
}

/// The largest artifact downloaded: an answer beyond it fails the deploy
/// instead of filling the host's disk.
pub const MAX_DOWNLOAD_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// The longest line and the most lines of a download's response head.
const MAX_HEAD_LINE: u64 = 8 * 1024;
const MAX_HEAD_LINES: usize = 100;

/// GETs `url` into `target`, streaming, at most `max_bytes`.
fn download(url: &Url, raw: &str, target: &Path, max_bytes: u64) -> Result<(), ArtifactError> {
    const F: &str = "artifact.url";
    let fail = |what: String| host_error(F, format!("cannot download `{raw}`: {what}"));
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| fail(e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| fail(e.to_string()))?;
    let path = if url.base_path.is_empty() {
        "/"
    } else {
        url.base_path.as_str()
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nUser-Agent: keelson-agent\r\n\r\n",
        url.host, url.port
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let mut reader = BufReader::new(stream);
    let head_line = |reader: &mut BufReader<TcpStream>| -> Result<String, ArtifactError> {
        let mut bytes = Vec::new();
        (&mut *reader)
            .take(MAX_HEAD_LINE)
            .read_until(b'\n', &mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        if bytes.last() != Some(&b'\n') {
            return Err(fail(if bytes.len() as u64 == MAX_HEAD_LINE {
                "a response header line is too long".into()
            } else {
                "the response head ended early".into()
            }));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let line = head_line(&mut reader)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail("not an HTTP response".into()))?;
    let mut length: Option<u64> = None;
    let mut lines = 0;
    loop {
        let line = head_line(&mut reader)?;
        let t = line.trim_end();
        if t.is_empty() {
            break;
        }
        lines += 1;
        if lines > MAX_HEAD_LINES {
            return Err(fail("too many response headers".into()));
        }
        if let Some((n, v)) = t.split_once(':') {
            let n = n.trim().to_ascii_lowercase();
            if n == "content-length" {
                length = v.trim().parse().ok();
            } else if n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                return Err(fail(
                    "chunked responses are not supported; serve the file with a Content-Length"
                        .into(),
                ));
            }
        }
    }
    if status != 200 {
        return Err(bad(F, format!("cannot download `{raw}`: HTTP {status}")));
    }
    let too_big = || {
        bad(
            F,
            format!("cannot download `{raw}`: it is larger than the limit of {max_bytes} bytes"),
        )
    };
    if length.is_some_and(|n| n > max_bytes) {
        return Err(too_big());
    }
    let mut file = std::fs::File::create(target).map_err(|e| fail(e.to_string()))?;
    let copied = std::io::copy(
        &mut reader.take(length.unwrap_or(max_bytes.saturating_add(1))),
        &mut file,
    )
    .map_err(|e| fail(e.to_string()))?;
    if copied > max_bytes {
        drop(file);
        let _ = std::fs::remove_file(target);
        return Err(too_big());
    }
    if length.is_some_and(|n| n != copied) {
        return Err(fail(format!(
            "got {copied} of {} bytes",
            length.unwrap_or(0)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url_check(url: &str, allowed: &[&str]) -> Result<(), ArtifactError> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        check(&Artifact::Url(url.into()), &[], &allowed)
    }

    /// Answers one connection on loopback with `head` and then `body_len`
    /// bytes of `x`, written as long as the client reads.
    fn one_shot(head: String, body_len: usize) -> Url {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(head.as_bytes());
            let block = vec![b'x'; 64 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(block.len());
                if s.write_all(&block[..n]).is_err() {
                    return;
                }
                left -= n;
            }
        });
        Url::parse(&format!("http://127.0.0.1:{port}/a.tgz")).unwrap()
    }

    #[test]
    fn downloads_beyond_the_limit_fail_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.tgz");
        // Announced too big: refused before reading the body.
        let url = one_shot(
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n".into(),
            10,
        );
        let err = download(&url, "u", &target, 1000).unwrap_err();
        assert!(err.message.contains("larger than the limit"), "{err}");
        assert!(!target.exists());
        // No length and an endless body: cut at the limit.
        let url = one_shot("HTTP/1.1 200 OK\r\n\r\n".into(), 1 << 20);
        let err = download(&url, "u", &target, 1000).unwrap_err();
        assert!(err.message.contains("larger than the limit"), "{err}");
        assert!(!target.exists());
        // Within the limit, without a length: all of it.
        let url = one_shot("HTTP/1.1 200 OK\r\n\r\n".into(), 1000);
        download(&url, "u", &target, 1000).unwrap();
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 1000);
    }

    #[test]
    fn a_download_with_an_endless_header_line_fails() {
        let dir = tempfile::tempdir().unwrap();
        let head = format!("HTTP/1.1 200 OK\r\nX-Big: {}", "a".repeat(1 << 20));
        let url = one_shot(head, 0);
        let err = download(&url, "u", &dir.path().join("a"), 1000).unwrap_err();
        assert!(err.message.contains("too long"), "{err}");
        let head = format!("HTTP/1.1 200 OK\r\n{}", "X: y\r\n".repeat(5000));
        let url = one_shot(head, 0);
        let err = download(&url, "u", &dir.path().join("a"), 1000).unwrap_err();
        assert!(err.message.contains("too many"), "{err}");
    }

    fn tar(dir: &Path, archive: &Path, members: &[&str]) {
        let status = Command::new("tar")
            .arg("-cf")
            .arg(archive)
            .arg("-C")
            .arg(dir)
            .args(members)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn archives_with_symlinks_out_of_the_tree_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (roots, src) = (vec![tmp.path().join("roots")], tmp.path().join("src"));
        std::fs::create_dir_all(src.join("lib")).unwrap();
        std::fs::create_dir_all(&roots[0]).unwrap();
        std::fs::write(src.join("lib/a.so"), "a").unwrap();
        std::os::unix::fs::symlink("/etc", src.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../outside", src.join("lib/up")).unwrap();
        std::os::unix::fs::symlink("a.so", src.join("lib/a.so.1")).unwrap();
        std::os::unix::fs::symlink("../lib/a.so", src.join("lib/same")).unwrap();
        let scratch = tmp.path().join("scratch");
        for (member, ok) in [("etc", false), ("lib/up", false), ("lib", false)] {
            let archive = roots[0].join(format!("{}.tar", member.replace('/', "-")));
            tar(&src, &archive, &[member]);
            let work = tmp
                .path()
                .join(format!("work-{ok}-{}", member.replace('/', "-")));
            let artifact = Artifact::Path(archive.display().to_string());
            let err = install(&artifact, &roots, &[], &work, &scratch).unwrap_err();
            assert!(err.bad_request, "{member}: {err}");
            assert!(err.message.contains("points outside the archive"), "{err}");
            assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "{member}");
        }
        // Links that stay inside are fine.
        std::fs::remove_file(src.join("lib/up")).unwrap();
        let archive = roots[0].join("fine.tar");
        tar(&src, &archive, &["lib"]);
        let work = tmp.path().join("fine");
        let artifact = Artifact::Path(archive.display().to_string());
        install(&artifact, &roots, &[], &work, &scratch).unwrap();
        assert_eq!(std::fs::read_to_string(work.join("lib/same")).unwrap(), "a");
    }

    #[test]
    fn a_directory_artifact_does_not_copy_files_from_outside_the_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = vec![tmp.path().join("roots")];
        let app = roots[0].join("app");
        std::fs::create_dir_all(&app).unwrap();
        std::fs::write(tmp.path().join("secret"), "s3cret").unwrap();
        std::fs::write(roots[0].join("shared.conf"), "shared").unwrap();
        std::os::unix::fs::symlink(roots[0].join("shared.conf"), app.join("app.conf")).unwrap();
        let artifact = Artifact::Path(app.display().to_string());
        let work = tmp.path().join("work");
        install(&artifact, &roots, &[], &work, &tmp.path().join("s")).unwrap();
        assert_eq!(
            std::fs::read_to_string(work.join("app.conf")).unwrap(),
            "shared"
        );

        std::os::unix::fs::symlink(tmp.path().join("secret"), app.join("leak")).unwrap();
        let work = tmp.path().join("work2");
        let err = install(&artifact, &roots, &[], &work, &tmp.path().join("s")).unwrap_err();
        assert!(err.bad_request, "{err}");
        assert!(err.message.contains("artifact roots"), "{err}");
        assert!(!work.join("leak").exists());
    }

    #[test]
    fn allowed_urls_match_host_port_and_path_segments_not_text() {
        let prefixes = [
            "http://allowed.example.com",
            "http://files.example.com:8080/releases/",
        ];
        for ok in [
            "http://allowed.example.com/app.tar.gz",
            "http://ALLOWED.example.com/a/b.tgz",
            "http://allowed.example.com:80/app.tar",
            "http://files.example.com:8080/releases/app-1.tgz",
            "http://files.example.com:8080/releases/1.0/app.tgz?sig=x",
        ] {
            assert_eq!(url_check(ok, &prefixes), Ok(()), "{ok}");
        }
        for bad in [
            "http://allowed.example.com.evil/app.tar.gz",
            "http://allowed.example.com.evil.net:80/x",
            "http://allowed.example.com@evil.net/app.tar.gz",
            "http://allowed.example.com:80@evil.net/app.tar.gz",
            "http://allowed@evil.net/",
            "http://allowed.example.com:8081/app.tar.gz",
            "http://files.example.com:8080/releases-private/app.tgz",
            "http://files.example.com:8080/releases/../admin/app.tgz",
            "http://files.example.com:8080/releases/%2e%2E/admin/app.tgz",
            "http://files.example.com:8080/releases/..%2fadmin/app.tgz",
            "http://files.example.com:8080/releases/..\\admin/app.tgz",
            "http://files.example.com/releases/app.tgz",
            "https://allowed.example.com/app.tar.gz",
        ] {
            let err = url_check(bad, &prefixes).unwrap_err();
            assert_eq!(err.field, "artifact.url", "{bad}");
            assert!(err.bad_request, "{bad}");
        }
    }
}
