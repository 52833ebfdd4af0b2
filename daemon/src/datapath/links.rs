//! Attaching programs so that they outlive the daemon and are never attached twice.
//!
//! Every link is pinned as `link_<program>` under the pin directory, and described in a record
//! in the state directory (the kernel does not report an XDP link's mode). On start a pinned
//! link whose record matches what is wanted is adopted: the freshly loaded program replaces the
//! old one atomically (`bpf_link_update`). A pinned link that does not match is unpinned, which
//! detaches it, and the program is attached fresh.

use std::{
    collections::BTreeMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{config::XdpModeSetting, error::Error};

/// What is attached where.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub program: String,
    /// `xdp` or `tc`.
    pub kind: String,
    pub interface: String,
    pub ifindex: u32,
    /// XDP: `native` or `generic`; TC: `tcx-ingress` or `tcx-egress`.
    pub mode: String,
    /// RFC 3339, when the link was first created (kept when a restart adopts it).
    pub attached_since: String,
}

/// How a program is to be attached.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    Xdp(XdpModeSetting),
    TcIngress,
    TcEgress,
}

impl Hook {
    fn kind(self) -> &'static str {
        match self {
            Hook::Xdp(_) => "xdp",
            Hook::TcIngress | Hook::TcEgress => "tc",
        }
    }

    /// Whether an existing attachment in `mode` satisfies this hook.
    fn accepts(self, mode: &str) -> bool {
        match self {
            Hook::Xdp(XdpModeSetting::Auto) => mode == "native" || mode == "generic",
            Hook::Xdp(XdpModeSetting::Native) => mode == "native",
            Hook::Xdp(XdpModeSetting::Generic) => mode == "generic",
            Hook::TcIngress => mode == "tcx-ingress",
            Hook::TcEgress => mode == "tcx-egress",
        }
    }
}

/// The pin directory and the records file.
pub struct LinkStore {
    pin_dir: PathBuf,
    record_path: PathBuf,
}

impl LinkStore {
    pub fn new(pin_dir: &Path, state_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            record_path: state_dir.join("datapath-attachments.json"),
        }
    }

    fn pin_path(&self, program: &str) -> PathBuf {
        self.pin_dir.join(format!("link_{program}"))
    }

    fn records(&self) -> BTreeMap<String, Attachment> {
        std::fs::read_to_string(&self.record_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save(&self, records: &BTreeMap<String, Attachment>) -> Result<(), Error> {
        crate::store::write_json(&self.record_path, records)
    }

    fn set_record(&self, record: &Attachment) -> Result<(), Error> {
        let mut records = self.records();
        records.insert(record.program.clone(), record.clone());
        self.save(&records)
    }

    fn drop_record(&self, program: &str) {
        let mut records = self.records();
        if records.remove(program).is_some()
            && let Err(e) = self.save(&records)
        {
            warn!(error = %e, "cannot update attachment records");
        }
    }

    /// Unpins `program`'s link (detaching it once our own handle is dropped too).
    pub fn release(&self, program: &str) {
        let pin = self.pin_path(program);
        if let Err(e) = std::fs::remove_file(&pin)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %pin.display(), error = %e, "cannot unpin link");
        }
        self.drop_record(program);
    }

    /// Attaches `program` on `interface`, or adopts the pinned link that already does so.
    pub fn attach(
        &self,
        ebpf: &mut Ebpf,
        program: &str,
        hook: Hook,
        interface: &str,
        ifindex: u32,
    ) -> Result<Attachment, Error> {
        let pin = self.pin_path(program);
        if pin.exists() {
            let record = self.records().remove(program);
            let pinned = PinnedLink::from_pin(&pin)?;
            match record {
                Some(r)
                    if r.interface == interface
                        && r.ifindex == ifindex
                        && hook.accepts(&r.mode) =>
                {
                    adopt(ebpf, program, hook, pinned)?;
                    info!(program, interface, mode = %r.mode, "adopted the pinned link");
                    return Ok(r);
                }
                _ => {
                    warn!(program, path = %pin.display(), "replacing a pinned link that does not match the configuration");
                    drop(pinned.unpin().map_err(|e| Error::io(&pin, e))?);
                }
            }
        }
        let mode = attach_fresh(ebpf, program, hook, interface, &pin)?;
        let record = Attachment {
            program: program.into(),
            kind: hook.kind().into(),
            interface: interface.into(),
            ifindex,
            mode: mode.into(),
            attached_since: crate::protocol::timestamp_now(),
        };
        self.set_record(&record)?;
        info!(program, interface, mode, "attached");
        Ok(record)
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Datapath(format!("the eBPF object has no program {name}")))?;
    Ok(program.try_into()?)
}

fn adopt(ebpf: &mut Ebpf, program: &str, hook: Hook, pinned: PinnedLink) -> Result<(), Error> {
    let fd = FdLink::from(pinned);
    match hook {
        Hook::Xdp(_) => {
            let prog: &mut Xdp = program_mut(ebpf, program)?;
            prog.attach_to_link(XdpLink::try_from(fd)?)?;
        }
        Hook::TcIngress | Hook::TcEgress => {
            let prog: &mut SchedClassifier = program_mut(ebpf, program)?;
            prog.attach_to_link(SchedClassifierLink::try_from(fd)?)?;
        }
    }
    Ok(())
}

fn xdp_mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

/// Attaches, pins the link, and hands the pinned link back to the program so our handle and
/// the pin refer to the same link. Returns the mode name.
fn attach_fresh(
    ebpf: &mut Ebpf,
    program: &str,
    hook: Hook,
    interface: &str,
    pin: &Path,
) -> Result<&'static str, Error> {
    let name = CString::new(interface).map_err(|_| Error::config("interface name contains NUL"))?;
    let busy = |e: &dyn std::fmt::Display| {
        Error::Datapath(format!(
            "cannot attach {program} to {interface}: {e} (is another program attached?)"
        ))
    };
    let unpinnable = |e: &dyn std::fmt::Display| {
        // Kernels without BPF links attach through netlink, which cannot be pinned.
        Error::Datapath(format!(
            "{program}: link cannot be pinned on this kernel: {e}"
        ))
    };
    match hook {
        Hook::Xdp(setting) => {
            let prog: &mut Xdp = program_mut(ebpf, program)?;
            let modes: &[XdpMode] = match setting {
                XdpModeSetting::Auto => &[XdpMode::Driver, XdpMode::Skb],
                XdpModeSetting::Native => &[XdpMode::Driver],
                XdpModeSetting::Generic => &[XdpMode::Skb],
            };
            let mut last_error = None;
            for mode in modes {
                match prog.attach(&name, *mode) {
                    Ok(id) => {
                        let link = prog.take_link(id)?;
                        let fd = FdLink::try_from(link).map_err(|e| unpinnable(&e))?;
                        let pinned = fd.pin(pin)?;
                        prog.attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)?;
                        return Ok(xdp_mode_name(*mode));
                    }
                    Err(e) => {
                        info!(program, interface, mode = xdp_mode_name(*mode), error = %e, "XDP attach mode refused");
                        last_error = Some(e);
                    }
                }
            }
            Err(match last_error {
                Some(e) => busy(&e),
                None => Error::Datapath("no XDP mode to try".into()),
            })
        }
        Hook::TcIngress | Hook::TcEgress => {
            let (attach_type, mode) = match hook {
                Hook::TcIngress => (TcAttachType::Ingress, "tcx-ingress"),
                _ => (TcAttachType::Egress, "tcx-egress"),
            };
            let prog: &mut SchedClassifier = program_mut(ebpf, program)?;
            let id = prog.attach(&name, attach_type).map_err(|e| busy(&e))?;
            let link = prog.take_link(id)?;
            let fd = FdLink::try_from(link).map_err(|e| unpinnable(&e))?;
            let pinned = fd.pin(pin)?;
            prog.attach_to_link(SchedClassifierLink::try_from(FdLink::from(pinned))?)?;
            Ok(mode)
        }
    }
}
