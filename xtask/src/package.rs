//! `cargo xtask package`: the Debian package (docs/packaging.md).
//!
//! The package is assembled with `dpkg-deb` from the built binaries, what they print about
//! themselves (the default configuration, phantomd's man page and completions) and the files
//! in `packaging/debian/`. With `--bin-dir` it packs binaries already built there (the tests
//! pack the debug binaries they run anyway); without, it builds the release binaries first.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The package's name; its binaries are phantomd and phantom-api.
const PACKAGE: &str = "phantom";
/// The Maintainer field and the changelog's signature, unless `DEBFULLNAME` and `DEBEMAIL`
/// (Debian's usual variables, as dch reads them) name someone else.
const MAINTAINER_NAME: &str = "Phantom developers";
const MAINTAINER_EMAIL: &str = "phantom@example.org";
/// What the daemon needs besides the shared libraries dpkg-shlibdeps finds: `nft` (the
/// clients' NAT, wg/net.rs) and `groupadd` (postinst).
const DEPENDS: &[&str] = &["nftables", "passwd"];

pub struct Options {
    /// Where the built phantomd and phantom-api are.
    pub bin_dir: PathBuf,
    /// Where the .deb (and its staging tree) go.
    pub out_dir: PathBuf,
    /// Compress with gzip -1 instead of xz (quicker; the tests use it).
    pub fast: bool,
}

/// Builds the package; returns the path of the .deb.
pub fn build(root: &Path, opts: &Options) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let arch = arch.trim();
    let src = root.join("packaging/debian");
    let maintainer = format!(
        "{} <{}>",
        std::env::var("DEBFULLNAME").unwrap_or_else(|_| MAINTAINER_NAME.into()),
        std::env::var("DEBEMAIL").unwrap_or_else(|_| MAINTAINER_EMAIL.into())
    );
    let phantomd = opts.bin_dir.join("phantomd");
    let phantom_api = opts.bin_dir.join("phantom-api");
    for bin in [&phantomd, &phantom_api] {
        if !bin.is_file() {
            bail!("{} is missing: build the binaries first", bin.display());
        }
    }

    let stage = opts.out_dir.join(format!("{PACKAGE}-stage"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot clear {}", stage.display()))?;
    }
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<()> {
        let path = stage.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))
    };
    let read = |name: &str| -> Result<Vec<u8>> {
        let path = src.join(name);
        fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let run_bin = |bin: &Path, args: &[&str]| -> Result<Vec<u8>> {
        output_bytes(Command::new(bin).args(args))
    };

    // The binaries, without their symbol tables (Debian ships debug data apart).
    for (bin, rel) in [
        (&phantomd, "usr/sbin/phantomd"),
        (&phantom_api, "usr/bin/phantom-api"),
    ] {
        let dest = stage.join(rel);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir)?;
        }
        run(Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment", "-o"])
            .arg(&dest)
            .arg(bin))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
    }

    put(
        "etc/phantom/phantom.toml",
        &run_bin(&phantomd, &["--print-default-config"])?,
        0o644,
    )?;
    put(
        "usr/lib/systemd/system/phantomd.service",
        &read("phantomd.service")?,
        0o644,
    )?;
    put(
        "usr/share/man/man8/phantomd.8.gz",
        &gzip(&run_bin(&phantomd, &["--print-man-page"])?)?,
        0o644,
    )?;
    put(
        "usr/share/man/man1/phantom-api.1.gz",
        &gzip(&read("phantom-api.1")?)?,
        0o644,
    )?;
    for (shell, rel) in [
        ("bash", "usr/share/bash-completion/completions/phantomd"),
        ("zsh", "usr/share/zsh/vendor-completions/_phantomd"),
        ("fish", "usr/share/fish/vendor_completions.d/phantomd.fish"),
    ] {
        put(
            rel,
            &run_bin(&phantomd, &["--print-completions", shell])?,
            0o644,
        )?;
    }
    put(
        "usr/share/bash-completion/completions/phantom-api",
        &read("phantom-api.bash-completion")?,
        0o644,
    )?;
    put(
        &format!("usr/share/doc/{PACKAGE}/copyright"),
        &read("copyright")?,
        0o644,
    )?;
    let date = output(Command::new("date").arg("-R"))?;
    let changelog = format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask package` from the project's sources.\n\n -- {maintainer}  {}\n",
        date.trim()
    );
    put(
        &format!("usr/share/doc/{PACKAGE}/changelog.gz"),
        &gzip(changelog.as_bytes())?,
        0o644,
    )?;

    // Control files.
    let conffiles = ["/etc/phantom/phantom.toml"];
    put(
        "DEBIAN/conffiles",
        format!("{}\n", conffiles.join("\n")).as_bytes(),
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        put(&format!("DEBIAN/{script}"), &read(script)?, 0o755)?;
    }
    let files = payload_files(&stage)?;
    let mut md5sums = String::new();
    for rel in files
        .iter()
        .filter(|f| !conffiles.contains(&format!("/{f}").as_str()))
    {
        let sum = output(Command::new("md5sum").arg(rel).current_dir(&stage))?;
        md5sums.push_str(&sum);
    }
    put("DEBIAN/md5sums", md5sums.as_bytes(), 0o644)?;
    let installed_kib: u64 = files
        .iter()
        .map(|f| fs::metadata(stage.join(f)).map(|m| m.len().div_ceil(1024)))
        .sum::<std::io::Result<u64>>()?;
    let mut depends = shlib_depends(&opts.out_dir, &stage)?;
    depends.extend(DEPENDS.iter().map(|d| d.to_string()));
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {}\n\
         Section: net\n\
         Priority: optional\n\
         Description: WireGuard VPN host daemon with an eBPF data plane\n \
         phantomd runs a WireGuard VPN server with an XDP/TC guard, a DNS resolver that\n \
         blocks gambling domains for every client, a reverse proxy that shields the\n \
         host's web services with proof-of-work challenges, and Prometheus metrics.\n \
         phantom-api is its admin command line, over a Unix socket.\n",
        depends.join(", ")
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;

    let deb = opts.out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let compression: &[&str] = if opts.fast {
        &["-Zgzip", "-z1"]
    } else {
        &["-Zxz"]
    };
    run(Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .args(compression)
        .arg("--build")
        .arg(&stage)
        .arg(&deb)
        .stdout(Stdio::null()))?;
    // The staging tree is a second copy of the binaries: not worth the disk.
    fs::remove_dir_all(&stage).with_context(|| format!("cannot remove {}", stage.display()))?;
    Ok(deb)
}

/// The payload's regular files, relative to `stage`, sorted (DEBIAN/ excluded).
fn payload_files(stage: &Path) -> Result<Vec<String>> {
    fn walk(stage: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(stage, &path, out)?;
            } else if let Ok(rel) = path.strip_prefix(stage) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for top in ["etc", "usr"] {
        walk(stage, &stage.join(top), &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// The shared libraries the binaries link, as dpkg-shlibdeps names their packages.
fn shlib_depends(out_dir: &Path, stage: &Path) -> Result<Vec<String>> {
    // dpkg-shlibdeps wants to run beside a debian/control naming the package.
    let work = out_dir.join("shlibdeps");
    fs::create_dir_all(work.join("debian"))?;
    fs::write(
        work.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let stage = fs::canonicalize(stage)?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .arg(stage.join("usr/sbin/phantomd"))
            .arg(stage.join("usr/bin/phantom-api"))
            .current_dir(&work),
    )?;
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?;
    Ok(deps
        .split(',')
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect())
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    // -n: no name or time stamp in the header, so the same input gives the same bytes.
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run gzip")?;
    let mut stdin = child.stdin.take().context("gzip: no stdin")?;
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip: writer panicked"))??;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(out.stdout)
}

fn output(cmd: &mut Command) -> Result<String> {
    String::from_utf8(output_bytes(cmd)?).context("output is not UTF-8")
}
