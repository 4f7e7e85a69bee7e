//! The client's side of NTLM, the default login of on-premises EWS: the NEGOTIATE message,
//! then the AUTHENTICATE message answering the server's CHALLENGE. The messages are made by
//! the `sspi` crate; this module only holds one handshake's context between the two.

use base64::Engine as _;
use sspi::{
    AuthIdentity, AuthIdentityBuffers, BufferType, ClientRequestFlags, CredentialUse,
    DataRepresentation, Ntlm, SecurityBuffer, Sspi as _, SspiImpl, Username,
};

/// One handshake in progress.
pub struct Handshake {
    ntlm: Ntlm,
    creds: Option<AuthIdentityBuffers>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handshake(***)")
    }
}

/// Why a handshake could not go on.
#[derive(Debug, thiserror::Error)]
#[error("NTLM: {0}")]
pub struct NtlmError(String);

fn failed(e: impl std::fmt::Display) -> NtlmError {
    NtlmError(e.to_string())
}

impl Handshake {
    /// Starts a handshake as `user` (`DOMAIN\user` or a UPN); answers it and the NEGOTIATE
    /// message, base64, for `Authorization: NTLM …`.
    pub fn start(user: &str, password: &str) -> Result<(Handshake, String), NtlmError> {
        let identity = AuthIdentity {
            username: Username::parse(user).map_err(failed)?,
            password: password.to_owned().into(),
        };
        let mut ntlm = Ntlm::new();
        let creds = ntlm
            .acquire_credentials_handle()
            .with_credential_use(CredentialUse::Outbound)
            .with_auth_data(&identity)
            .execute(&mut ntlm)
            .map_err(failed)?
            .credentials_handle;
        let mut handshake = Handshake { ntlm, creds };
        let negotiate = handshake.step(None)?;
        Ok((handshake, negotiate))
    }

    /// Answers the server's CHALLENGE (base64) with the AUTHENTICATE message (base64).
    pub fn answer(mut self, challenge: &str) -> Result<String, NtlmError> {
        let challenge = base64::engine::general_purpose::STANDARD
            .decode(challenge.trim())
            .map_err(failed)?;
        self.step(Some(challenge))
    }

    fn step(&mut self, input: Option<Vec<u8>>) -> Result<String, NtlmError> {
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let mut input = input.map(|token| vec![SecurityBuffer::new(token, BufferType::Token)]);
        let builder = self
            .ntlm
            .initialize_security_context()
            .with_credentials_handle(&mut self.creds)
            .with_context_requirements(ClientRequestFlags::ALLOCATE_MEMORY)
            .with_target_data_representation(DataRepresentation::Native)
            .with_output(&mut output);
        let mut builder = match input.as_mut() {
            Some(input) => builder.with_input(input),
            None => builder,
        };
        SspiImpl::initialize_security_context_impl(&mut self.ntlm, &mut builder)
            .map_err(failed)?
            .resolve_to_result()
            .map_err(failed)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(&output[0].buffer))
    }
}

/// The scheme to start NTLM's handshake under, when an answer is a 401 that offers it.
pub fn scheme_asked(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Option<&'static str> {
    (status == reqwest::StatusCode::UNAUTHORIZED)
        .then(|| scheme(&offered(headers)))
        .flatten()
}

/// The server's CHALLENGE, when an answer to NEGOTIATE is a 401 that carries one.
pub fn challenge_asked(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Option<String> {
    (status == reqwest::StatusCode::UNAUTHORIZED)
        .then(|| challenge_in(headers))
        .flatten()
}

/// The CHALLENGE in a 401's `WWW-Authenticate: NTLM …` (or `Negotiate …` carrying NTLM), if
/// there is one.
fn challenge_in(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let (scheme, token) = v.split_once(' ')?;
            (scheme.eq_ignore_ascii_case("ntlm") || scheme.eq_ignore_ascii_case("negotiate"))
                .then(|| token.trim().to_owned())
        })
}

/// The scheme to carry NTLM under, from what a 401 offers: `NTLM`, or `Negotiate` where only
/// that is offered (Windows takes NTLM's messages inside it as they are); none when neither.
fn scheme(offered: &[String]) -> Option<&'static str> {
    if offered.iter().any(|s| s == "ntlm") {
        Some("NTLM")
    } else if offered.iter().any(|s| s == "negotiate") {
        Some("Negotiate")
    } else {
        None
    }
}

/// The schemes a 401 offers, lowercased (`basic`, `ntlm`, `negotiate`, `bearer`).
pub fn offered(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|v| v.split_whitespace().next())
        .filter(|s| !s.contains('='))
        .map(str::to_ascii_lowercase)
        .collect()
}
