//! The hub's side of shared mode (several replicas, one store): the store's answers and the
//! messages other replicas send come in here. See [`crate::shared`].

use super::{Client, Hub, Role, Vol};
use crate::hub::ClientId;
use crate::msg::{ErrorCode, Outgoing, SessionId};
use crate::shared::{FromVolunteer, Relay, RouteFailure, StoreOp, VolunteerRef};

impl Hub {
    /// The next request for the store (shared mode; always `None` otherwise).
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.shared.as_mut()?.ops.pop_front()
    }

    /// This replica's id (shared mode).
    pub fn replica(&self) -> Option<&str> {
        self.shared.as_ref().map(|s| s.replica.as_str())
    }

    /// The volunteers connected here and the slots each last announced: what the store is
    /// told again after it lost its state (a restart).
    pub fn local_volunteers(&self) -> Vec<(ClientId, u32)> {
        let mut v: Vec<(ClientId, u32)> = self
            .clients
            .iter()
            .filter_map(|(id, c)| match c.role {
                Role::Volunteer { free, .. } if !c.closing => Some((*id, free)),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// The store's answer to [`StoreOp::Registered`]: the volunteer's slots are stored (or the
    /// store is down, and will be told them when it is back).
    pub fn registered(&mut self, client: ClientId) {
        if matches!(self.clients.get(&client), Some(Client { role: Role::Volunteer { .. }, .. })) {
            let name = self.vref(&Vol::Local(client)).key();
            self.send_registered(client, name);
        }
    }

    /// The store's answer to [`StoreOp::Pick`]: a volunteer whose slot it took, or none
    /// (none free, or the store unreachable).
    pub fn picked(&mut self, now: u64, session: SessionId, volunteer: Option<VolunteerRef>) {
        let v = volunteer.map(|r| self.vol(r));
        self.found(now, session, v);
    }

    /// The store could not pass volunteer `client`'s message about `session` to its owner.
    pub fn route_failed(&mut self, client: ClientId, session: SessionId, m: &FromVolunteer, why: RouteFailure) {
        if !matches!(m, FromVolunteer::Answer { .. }) {
            return;
        }
        if !matches!(self.clients.get(&client), Some(Client { role: Role::Volunteer { .. }, closing: false, .. })) {
            return;
        }
        match why {
            RouteFailure::UnknownSession => {
                self.send(client, Outgoing::Error { code: ErrorCode::UnknownSession, reason: "session is over".into() })
            }
            RouteFailure::OwnerGone => {
                let reason = "the consumer's signaling replica is gone".into();
                self.send(client, Outgoing::Cancel { session, reason });
                self.give_back_slot(&Vol::Local(client));
            }
        }
    }

    /// A message from another replica.
    pub fn relay(&mut self, now: u64, r: Relay) {
        match r {
            Relay::ToVolunteer { client, msg } => {
                if matches!(self.clients.get(&client), Some(Client { role: Role::Volunteer { .. }, .. })) {
                    self.send(client, msg.into());
                } else {
                    // No such volunteer here (it left, and the store did not hear of it):
                    // remove it everywhere, so its sessions move on and no pick finds it.
                    self.store(StoreOp::VolunteerGone { client });
                }
            }
            Relay::FromVolunteer { session, volunteer, msg } => {
                let v = self.vol(volunteer);
                self.owner_hears(now, &v, session, msg);
            }
            Relay::VolunteerGone { volunteer } => {
                let v = self.vol(volunteer);
                if matches!(v, Vol::Remote(_)) {
                    self.volunteer_gone(now, &v);
                }
            }
        }
    }

    /// A store's volunteer name as this hub sees it: its own client, or another replica's.
    fn vol(&self, r: VolunteerRef) -> Vol {
        match &self.shared {
            Some(s) if s.replica == r.replica => Vol::Local(r.client),
            _ => Vol::Remote(r),
        }
    }
}
