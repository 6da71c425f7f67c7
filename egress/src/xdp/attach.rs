//! Attaching the tracking to interfaces: native XDP, else TC ingress, else generic XDP, and
//! detaching on drop.

use super::errors::program_error;
use super::{Xdp, XdpUnavailable};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, XdpMode};
use egress_common::PROGRAM_NAME_TC;

/// How the tracking is attached to one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachMode,
}

/// Where on an interface's receive path the tracking runs, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// XDP in the driver, before any skb exists: the cheapest.
    Native,
    /// The TC ingress program (tcx): for interfaces without native XDP. Generic XDP would copy
    /// every cloned or non-linear skb (each TCP segment on loopback or a veth) to run at all.
    Tc,
    /// XDP in generic (SKB) mode: the last resort, when TC is refused too.
    Generic,
}

impl AttachMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Tc => "tc",
            AttachMode::Generic => "generic",
        }
    }
}

/// One attachment's handle, for detaching.
pub(super) enum Link {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

impl Xdp {
    pub(super) fn tc_mut(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(PROGRAM_NAME_TC)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("the program was checked at load")
    }

    fn attached_as(&mut self, interface: &str, link: Link, mode: AttachMode) {
        self.links.push(link);
        self.attached.push(Attachment { interface: interface.to_owned(), mode });
        tracing::info!(interface, mode = mode.label(), "XDP liveness attached");
    }

    /// Attaches to one more interface: native XDP, else TC ingress, else generic XDP.
    pub fn attach(&mut self, interface: &str) -> Result<(), XdpUnavailable> {
        let native = match self.program_mut().attach(interface, XdpMode::Driver) {
            Ok(link) => {
                self.attached_as(interface, Link::Xdp(link), AttachMode::Native);
                return Ok(());
            }
            Err(ProgramError::UnknownInterface { name }) => return Err(XdpUnavailable::NoSuchInterface(name)),
            Err(e) => match program_error(e) {
                XdpUnavailable::Permission(p) => return Err(XdpUnavailable::Permission(p)),
                e => e.to_string(),
            },
        };
        tracing::info!(interface, native_error = %native, "native XDP refused; attaching at TC ingress");
        // Kernels before 6.6 have no tcx: the program then goes into a clsact qdisc.
        let _ = aya::programs::tc::qdisc_add_clsact(interface);
        let tc = match self.tc_mut().attach(interface, TcAttachType::Ingress) {
            Ok(link) => {
                self.attached_as(interface, Link::Tc(link), AttachMode::Tc);
                return Ok(());
            }
            Err(e) => match program_error(e) {
                XdpUnavailable::Permission(p) => return Err(XdpUnavailable::Permission(p)),
                e => e.to_string(),
            },
        };
        tracing::info!(interface, tc_error = %tc, "TC ingress refused; trying generic XDP");
        match self.program_mut().attach(interface, XdpMode::Skb) {
            Ok(link) => {
                self.attached_as(interface, Link::Xdp(link), AttachMode::Generic);
                Ok(())
            }
            Err(e) => match program_error(e) {
                XdpUnavailable::Permission(p) => Err(XdpUnavailable::Permission(p)),
                generic => Err(XdpUnavailable::Attach {
                    interface: interface.to_owned(),
                    native,
                    tc,
                    generic: generic.to_string(),
                }),
            },
        }
    }
}

impl Drop for Xdp {
    fn drop(&mut self) {
        for link in std::mem::take(&mut self.links) {
            let r = match link {
                Link::Xdp(l) => self.program_mut().detach(l),
                Link::Tc(l) => self.tc_mut().detach(l),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot detach the liveness program");
            }
        }
        // Unloading the program and closing the maps (when `ebpf` drops) cancels the timer.
    }
}
