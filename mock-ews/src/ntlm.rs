//! NTLM as IIS runs it on the EWS virtual directory: per connection, a three-leg handshake
//! (NEGOTIATE, a 401 carrying the CHALLENGE, AUTHENTICATE), after which the connection acts as
//! its user until it closes. The messages are made and verified by the `sspi` crate; this
//! module keeps each connection's state and reads the user's name out of AUTHENTICATE to find
//! the password to verify against.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use sspi::{
    AuthIdentity, AuthIdentityBuffers, BufferType, CredentialUse, DataRepresentation, Ntlm,
    SecurityBuffer, SecurityStatus, ServerRequestFlags, Sspi as _, SspiImpl, Username,
};

/// Where one connection stands.
enum Conn {
    /// A CHALLENGE was sent; AUTHENTICATE is due.
    Challenged(Box<Ntlm>),
    /// The handshake succeeded for this mailbox.
    Authenticated(String),
}

/// One connection, among all the server accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnectionId(pub u64);

/// The NTLM state of every open connection.
#[derive(Default)]
pub(crate) struct Connections(Mutex<HashMap<ConnectionId, Conn>>);

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connections")
    }
}

/// What one `Authorization: NTLM …` header led to.
pub(crate) enum Step {
    /// Send this CHALLENGE (base64) in a 401.
    Challenge(String),
    /// The connection now acts as this mailbox.
    Authenticated(String),
    /// Start again with a 401.
    Refused,
}

const SIGNATURE: &[u8] = b"NTLMSSP\0";

impl Connections {
    /// The mailbox an earlier handshake on this connection authenticated.
    pub fn user(&self, connection: ConnectionId) -> Option<String> {
        match self.lock().get(&connection) {
            Some(Conn::Authenticated(user)) => Some(user.clone()),
            _ => None,
        }
    }

    /// Forgets a connection that closed.
    pub fn forget(&self, connection: ConnectionId) {
        self.lock().remove(&connection);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Conn>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one NTLM token from `connection`. `password_of` finds the mailbox
    /// and password of a user as AUTHENTICATE names it (user, domain).
    pub fn step(
        &self,
        connection: ConnectionId,
        token_b64: &str,
        password_of: impl Fn(&str, &str) -> Option<(String, String)>,
    ) -> Step {
        let Ok(token) = base64::engine::general_purpose::STANDARD.decode(token_b64.trim()) else {
            return Step::Refused;
        };
        if token.len() < 12 || &token[..8] != SIGNATURE {
            return Step::Refused;
        }
        match u32::from_le_bytes([token[8], token[9], token[10], token[11]]) {
            1 => match challenge(&token) {
                Some((ntlm, challenge)) => {
                    self.lock()
                        .insert(connection, Conn::Challenged(Box::new(ntlm)));
                    Step::Challenge(base64::engine::general_purpose::STANDARD.encode(challenge))
                }
                None => Step::Refused,
            },
            3 => {
                let Some(Conn::Challenged(mut ntlm)) = self.lock().remove(&connection) else {
                    return Step::Refused;
                };
                let Some((user, domain)) = names(&token) else {
                    return Step::Refused;
                };
                let Some((mailbox, password)) = password_of(&user, &domain) else {
                    return Step::Refused;
                };
                if verify(&mut ntlm, &token, &mailbox, &password) {
                    self.lock()
                        .insert(connection, Conn::Authenticated(mailbox.clone()));
                    Step::Authenticated(mailbox)
                } else {
                    Step::Refused
                }
            }
            _ => Step::Refused,
        }
    }
}

/// One AcceptSecurityContext step: `token` in; the status and the token to send back out.
fn accept(
    ntlm: &mut Ntlm,
    creds: &mut Option<AuthIdentityBuffers>,
    token: &[u8],
) -> Option<(SecurityStatus, Vec<u8>)> {
    let mut input = vec![SecurityBuffer::new(token.to_vec(), BufferType::Token)];
    let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
    let builder = ntlm
        .accept_security_context()
        .with_credentials_handle(creds)
        .with_context_requirements(ServerRequestFlags::ALLOCATE_MEMORY)
        .with_target_data_representation(DataRepresentation::Native)
        .with_input(&mut input)
        .with_output(&mut output);
    let result = SspiImpl::accept_security_context_impl(ntlm, builder)
        .ok()?
        .resolve_to_result()
        .ok()?;
    Some((result.status, std::mem::take(&mut output[0].buffer)))
}

/// Reads NEGOTIATE; answers the context and the CHALLENGE to send.
fn challenge(negotiate: &[u8]) -> Option<(Ntlm, Vec<u8>)> {
    let mut ntlm = Ntlm::new();
    let mut creds = ntlm
        .acquire_credentials_handle()
        .with_credential_use(CredentialUse::Inbound)
        .execute(&mut ntlm)
        .ok()?
        .credentials_handle;
    let (status, challenge) = accept(&mut ntlm, &mut creds, negotiate)?;
    (status == SecurityStatus::ContinueNeeded).then_some((ntlm, challenge))
}

/// Verifies AUTHENTICATE against the password.
fn verify(ntlm: &mut Ntlm, authenticate: &[u8], mailbox: &str, password: &str) -> bool {
    let Ok(username) = Username::parse(mailbox) else {
        return false;
    };
    let identity = AuthIdentity {
        username,
        password: password.to_owned().into(),
    };
    let mut creds = Some(identity.into());
    match accept(ntlm, &mut creds, authenticate) {
        Some((SecurityStatus::CompleteNeeded, _)) => {
            matches!(ntlm.complete_auth_token(&mut []), Ok(SecurityStatus::Ok))
        }
        Some((status, _)) => status == SecurityStatus::Ok,
        None => false,
    }
}

/// The user and domain names AUTHENTICATE carries (MS-NLMP 2.2.1.3: the domain's field at
/// byte 28, the user's at 36, each length, room and offset; UTF-16 when the Unicode flag, bit
/// 0 of the flags at byte 60, is set).
fn names(authenticate: &[u8]) -> Option<(String, String)> {
    let u16_at = |i: usize| {
        Some(u16::from_le_bytes([
            *authenticate.get(i)?,
            *authenticate.get(i + 1)?,
        ]))
    };
    let u32_at = |i: usize| {
        Some(u32::from_le_bytes([
            *authenticate.get(i)?,
            *authenticate.get(i + 1)?,
            *authenticate.get(i + 2)?,
            *authenticate.get(i + 3)?,
        ]))
    };
    let unicode = u32_at(60)? & 1 == 1;
    let field = |at: usize| -> Option<String> {
        let len = usize::from(u16_at(at)?);
        let offset = usize::try_from(u32_at(at + 4)?).ok()?;
        let bytes = authenticate.get(offset..offset.checked_add(len)?)?;
        if unicode {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        } else {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
    };
    Some((field(36)?, field(28)?))
}
