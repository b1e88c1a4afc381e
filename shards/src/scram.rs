//! SCRAM-SHA-256 (RFC 5802, RFC 7677) for MQTT 5 enhanced authentication, without I/O.
//!
//! Owns: the credential text kept in the users file ([`ScramCredentials`], PostgreSQL's
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` form), the server side of one
//! exchange ([`ServerExchange`]) and the client side ([`ClientExchange`], for tests and the bench
//! tool). Bytes in, bytes out: the connection code carries the messages in MQTT packets with
//! Authentication Method [`METHOD`], as EMQX does:
//!
//! 1. CONNECT's Authentication Data is the client-first-message: [`ServerExchange::start`] parses
//!    it and names the user, the caller looks the user up and calls [`ServerExchange::challenge`];
//! 2. AUTH (0x18, continue) carries the server-first-message back;
//! 3. the client's AUTH carries the client-final-message: [`ServerExchange::finish`];
//! 4. CONNACK (success) carries the server-final-message `v=<ServerSignature>`, which the client
//!    checks ([`ClientExchange::verify_server_final`]): the server proves it knows the ServerKey.
//!
//! Does not own: the packets, the users file, the choice of reason codes (a refusal says only
//! whether the data was malformed), timeouts between the steps (the connection code's keep-alive
//! and connect timeout bound them).
//!
//! Deliberately not done:
//! - SASLprep (RFC 4013) of user names and passwords. User names get only the RFC 5802 escapes
//!   (`=2C` for `,`, `=3D` for `=`; any other `=` sequence is refused); passwords are used as the
//!   bytes given. Clients that normalise non-ASCII passwords differently will not match.
//! - Channel binding (`SCRAM-SHA-256-PLUS`): a `p=` gs2 flag is refused; `n` and `y` are accepted
//!   (this server offers no channel binding, so `y` is not a downgrade).
//! - Authorization identities other than the user itself (`a=` is accepted only if equal to `n=`).
//! - The `m=` mandatory extension: refused, as RFC 5802 §5.1 requires.
//!
//! Invariants:
//! - The password never leaves [`ClientExchange`]; the server holds only salt, iteration count,
//!   StoredKey and ServerKey, and neither is printed by `Debug`.
//! - An unknown user is indistinguishable from a known one until [`ServerExchange::finish`]: the
//!   challenge uses fake credentials derived from the user name under a per-process random
//!   secret (same salt for the same name, 4096 iterations), and the refusal happens at the end.
//!   Limits: the fake salt changes when the broker restarts, and a real user whose iteration count
//!   is not 4096 differs from a fake one.
//! - The client's proof is compared in constant time (`subtle::ConstantTimeEq` on
//!   `SHA-256(ClientKey)` against StoredKey), as is the server's signature on the client side.
//! - No input panics: every parser returns a refusal or an error.
//!
//! Bounds: client messages over [`MESSAGE_LEN_MAX_BYTES`] are refused before parsing (the client
//! applies the same bound to server messages); iteration counts are within
//! [`ITERATIONS_MIN`]..=[`ITERATIONS_MAX`] in parsed credentials and in the server-first-message the
//! client accepts (so a server cannot make a client spin for long); salts are at most
//! [`SALT_LEN_MAX_BYTES`]. The server does no PBKDF2: its cost per exchange is two HMACs and a hash.
//!
//! Owner: none; each exchange is a plain value owned by the connection task that runs it, and
//! [`ServerExchange::finish`] consumes it, so an exchange cannot be completed twice.

use std::fmt;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The MQTT 5 Authentication Method this module implements.
pub const METHOD: &str = "SCRAM-SHA-256";
/// The iteration count used when none is chosen (RFC 7677 §4's minimum).
pub const ITERATIONS_DEFAULT: u32 = 4096;
/// The lowest iteration count accepted in credentials and from a server (RFC 7677 §4).
pub const ITERATIONS_MIN: u32 = 4096;
/// The highest iteration count accepted, so that one login cannot cost seconds of CPU.
pub const ITERATIONS_MAX: u32 = 10_000_000;
/// The length of the random salt [`ScramCredentials::derive`] makes.
pub const SALT_LEN_BYTES: usize = 16;
/// The longest salt accepted in credentials and from a server.
pub const SALT_LEN_MAX_BYTES: usize = 64;
/// The longest SCRAM message accepted from the other side (1 KiB).
pub const MESSAGE_LEN_MAX_BYTES: usize = 1024;
/// Random bytes in a nonce; base64 makes them 24 printable characters without `,`.
const NONCE_RANDOM_LEN_BYTES: usize = 18;
/// The prefix of the credential text.
const CREDENTIALS_PREFIX: &str = "SCRAM-SHA-256$";

/// A SHA-256 sized key or signature.
type Key = [u8; 32];
type HmacSha256 = Hmac<Sha256>;

/// Stored credentials of a user: salt, iteration count, StoredKey, ServerKey (never the password).
///
/// `Display` gives the users-file text `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey
/// b64>:<ServerKey b64>` (PostgreSQL's format); [`ScramCredentials::parse`] reads it back.
/// `Debug` prints the salt and iteration count but not the keys: the ServerKey lets whoever holds
/// it pose as the server, so it is kept out of logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramCredentials {
    /// Derives credentials from a password with a fresh random 16-byte salt and `iterations`
    /// ([`ITERATIONS_DEFAULT`] is 4096). Counts outside
    /// [`ITERATIONS_MIN`]..=[`ITERATIONS_MAX`] are moved to the nearest bound, so the result
    /// always parses back. Costs `iterations` HMAC-SHA-256 computations (milliseconds at 4096).
    ///
    /// Panics only if the operating system's random source fails.
    pub fn derive(password: &[u8], iterations: u32) -> ScramCredentials {
        let salt: [u8; SALT_LEN_BYTES] = random_bytes();
        ScramCredentials::derive_with_salt(password, &salt, iterations)
    }

    /// Derives credentials with a given salt (RFC 5802 §3): SaltedPassword =
    /// PBKDF2-HMAC-SHA-256(password, salt, i), ClientKey = HMAC(SaltedPassword, "Client Key"),
    /// StoredKey = SHA-256(ClientKey), ServerKey = HMAC(SaltedPassword, "Server Key").
    fn derive_with_salt(password: &[u8], salt: &[u8], iterations: u32) -> ScramCredentials {
        let iterations = iterations.clamp(ITERATIONS_MIN, ITERATIONS_MAX);
        let keys = ClientKeys::derive(password, salt, iterations);
        ScramCredentials {
            salt: salt.to_vec(),
            iterations,
            stored_key: keys.stored_key,
            server_key: keys.server_key,
        }
    }

    /// Reads the users-file text written by `Display`:
    /// `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>` (standard base64
    /// with padding). The error says which part is wrong, never the keys themselves.
    pub fn parse(text: &str) -> Result<ScramCredentials, String> {
        const SHAPE: &str =
            "expected SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>";
        let Some(rest) = text.strip_prefix(CREDENTIALS_PREFIX) else {
            return Err(format!("SCRAM credentials must start with `{CREDENTIALS_PREFIX}`; {SHAPE}"));
        };
        let Some((iterations_and_salt, keys)) = rest.split_once('$') else {
            return Err(format!("SCRAM credentials have no `$` between the salt and the keys; {SHAPE}"));
        };
        let (Some((iterations_text, salt_text)), Some((stored_text, server_text))) =
            (iterations_and_salt.split_once(':'), keys.split_once(':'))
        else {
            return Err(format!("SCRAM credentials are missing a `:`; {SHAPE}"));
        };
        let iterations: u32 = iterations_text
            .parse()
            .map_err(|_| format!("SCRAM iteration count `{iterations_text}` is not a whole number"))?;
        if !(ITERATIONS_MIN..=ITERATIONS_MAX).contains(&iterations) {
            return Err(format!(
                "SCRAM iteration count {iterations} is outside {ITERATIONS_MIN}..={ITERATIONS_MAX}"
            ));
        }
        let salt = BASE64.decode(salt_text).map_err(|_| "SCRAM salt is not valid base64".to_string())?;
        if salt.is_empty() || salt.len() > SALT_LEN_MAX_BYTES {
            return Err(format!("SCRAM salt is {} bytes; it must be 1 to {SALT_LEN_MAX_BYTES}", salt.len()));
        }
        let stored_key =
            decode_key(stored_text).ok_or_else(|| "SCRAM StoredKey is not 32 bytes in base64".to_string())?;
        let server_key =
            decode_key(server_text).ok_or_else(|| "SCRAM ServerKey is not 32 bytes in base64".to_string())?;
        Ok(ScramCredentials { salt, iterations, stored_key, server_key })
    }

    /// Credentials for a user that does not exist, stable per user name for the life of the
    /// process: the salt is an HMAC of the name under a random secret made once per process, so
    /// it looks random yet repeats. The keys are derived the same way; they are never checked,
    /// since [`ServerExchange::finish`] refuses an unknown user whatever the proof.
    fn fake_for(username: &str) -> ScramCredentials {
        static FAKE_SECRET: OnceLock<Key> = OnceLock::new();
        let secret = FAKE_SECRET.get_or_init(random_bytes);
        let keyed = |label: &[u8]| {
            let mut mac = hmac_for(secret);
            mac.update(label);
            mac.update(username.as_bytes());
            let out: Key = mac.finalize().into_bytes().into();
            out
        };
        ScramCredentials {
            salt: keyed(b"salt\0")[..SALT_LEN_BYTES].to_vec(),
            iterations: ITERATIONS_DEFAULT,
            stored_key: keyed(b"stored-key\0"),
            server_key: keyed(b"server-key\0"),
        }
    }
}

impl fmt::Display for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{CREDENTIALS_PREFIX}{}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

impl fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramCredentials")
            .field("salt", &BASE64.encode(&self.salt))
            .field("iterations", &self.iterations)
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

/// What the server does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStep {
    /// Send this server-first-message (AUTH continue), then call [`ServerExchange::finish`] with
    /// the client's next data.
    Challenge(Vec<u8>),
    /// Refused, with the reason for logs (never sent to the client).
    ///
    /// `malformed: true`: the data is not SCRAM-SHA-256 as this server speaks it: bad syntax, an
    /// oversized message, or a feature it does not offer (channel binding, `m=`, another
    /// authorization identity); the broker answers CONNACK 0x8C. `malformed: false`: well formed
    /// but not authenticated (unknown user, wrong password, nonce mismatch); the broker answers
    /// CONNACK 0x86 (bad user name or password).
    Refused { malformed: bool, reason: &'static str },
}

fn malformed(reason: &'static str) -> ServerStep {
    ServerStep::Refused { malformed: true, reason }
}

fn not_authenticated(reason: &'static str) -> ServerStep {
    ServerStep::Refused { malformed: false, reason }
}

/// The server side of one exchange.
///
/// Owner: the connection task that received the CONNECT (no shard-wide state). Lifecycle:
/// [`ServerExchange::start`] → [`ServerExchange::challenge`] (once; a second call replaces the
/// challenge with a new nonce) → [`ServerExchange::finish`], which consumes it. Bounds: holds the
/// client-first-message (at most [`MESSAGE_LEN_MAX_BYTES`]) and the server-first-message.
pub struct ServerExchange {
    username: String,
    /// `n,,`, `y,,` or with an authzid `n,a=<user>,`: what `c=` must encode.
    gs2_header: String,
    client_first_bare: String,
    client_nonce: String,
    challenge: Option<Challenge>,
}

/// The state between the challenge and the client-final-message.
struct Challenge {
    server_first: String,
    /// Client nonce followed by server nonce: the `r=` the client-final-message must repeat.
    combined_nonce: String,
    stored_key: Key,
    server_key: Key,
    user_known: bool,
}

impl fmt::Debug for ServerExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerExchange")
            .field("username", &self.username)
            .field("gs2_header", &self.gs2_header)
            .field("challenged", &self.challenge.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerExchange {
    /// Parses the client-first-message (`n,,n=<user>,r=<nonce>`; gs2 header `n,,` or `y,,`
    /// accepted, `p=` channel binding refused; `a=` authzid refused unless equal to the user),
    /// returning the user name (escapes decoded) so the caller can look up credentials.
    ///
    /// The error is always [`ServerStep::Refused`] with `malformed: true`.
    pub fn start(client_first: &[u8]) -> Result<(ServerExchange, String), ServerStep> {
        let text = client_message_text(client_first)?;
        let Some((cbind_flag, after_flag)) = text.split_once(',') else {
            return Err(malformed("client-first-message has no gs2 header"));
        };
        match cbind_flag {
            "n" | "y" => {}
            flag if flag.starts_with("p=") => {
                return Err(malformed("channel binding (SCRAM-SHA-256-PLUS) is not supported"))
            }
            _ => return Err(malformed("gs2 channel-binding flag is not n, y or p=")),
        }
        let Some((authzid_field, bare)) = after_flag.split_once(',') else {
            return Err(malformed("client-first-message gs2 header is not terminated"));
        };
        let authzid = if authzid_field.is_empty() {
            None
        } else {
            let Some(encoded) = authzid_field.strip_prefix("a=") else {
                return Err(malformed("gs2 authzid is not a=<name>"));
            };
            Some(decode_saslname(encoded).map_err(malformed)?)
        };
        let gs2_header = &text[..text.len() - bare.len()];

        let mut attributes = bare.split(',');
        let first = attributes.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(malformed("mandatory extension (m=) is not supported"));
        }
        let Some(encoded_user) = first.strip_prefix("n=") else {
            return Err(malformed("client-first-message does not start with n=<user>"));
        };
        let username = decode_saslname(encoded_user).map_err(malformed)?;
        let Some(client_nonce) = attributes.next().and_then(|a| a.strip_prefix("r=")) else {
            return Err(malformed("client-first-message has no nonce (r=) after the user"));
        };
        check_nonce(client_nonce).map_err(malformed)?;
        for extension in attributes {
            check_extension(extension).map_err(malformed)?;
        }
        if authzid.is_some_and(|authzid| authzid != username) {
            return Err(malformed("authorization identity (a=) other than the user is not supported"));
        }
        let exchange = ServerExchange {
            username: username.clone(),
            gs2_header: gs2_header.to_string(),
            client_first_bare: bare.to_string(),
            client_nonce: client_nonce.to_string(),
            challenge: None,
        };
        Ok((exchange, username))
    }

    /// With the user's credentials (None: unknown user — the exchange continues with fake,
    /// deterministic-per-user-name credentials so an attacker cannot tell unknown users apart,
    /// and fails at [`ServerExchange::finish`]): produces the server-first-message
    /// `r=<client nonce><server nonce>,s=<salt b64>,i=<iterations>`.
    ///
    /// Panics only if the operating system's random source fails.
    pub fn challenge(&mut self, credentials: Option<&ScramCredentials>) -> Vec<u8> {
        let random: [u8; NONCE_RANDOM_LEN_BYTES] = random_bytes();
        self.challenge_with_server_nonce(credentials, &BASE64.encode(random))
    }

    /// [`ServerExchange::challenge`] with a given server nonce (printable, no `,`).
    fn challenge_with_server_nonce(
        &mut self,
        credentials: Option<&ScramCredentials>,
        server_nonce: &str,
    ) -> Vec<u8> {
        debug_assert!(check_nonce(server_nonce).is_ok());
        let fake;
        let (credentials, user_known) = match credentials {
            Some(credentials) => (credentials, true),
            None => {
                fake = ScramCredentials::fake_for(&self.username);
                (&fake, false)
            }
        };
        let combined_nonce = format!("{}{server_nonce}", self.client_nonce);
        let server_first =
            format!("r={combined_nonce},s={},i={}", BASE64.encode(&credentials.salt), credentials.iterations);
        let message = server_first.clone().into_bytes();
        self.challenge = Some(Challenge {
            server_first,
            combined_nonce,
            stored_key: credentials.stored_key,
            server_key: credentials.server_key,
            user_known,
        });
        message
    }

    /// Verifies the client-final-message (`c=<gs2 header b64>,r=<nonce>,p=<proof>`: `c=biws` for
    /// `n,,`, `c=eSws` for `y,,`; the nonce must equal the combined nonce); on success returns
    /// the server-final-message `v=<ServerSignature b64>` for the CONNACK.
    ///
    /// The error is always [`ServerStep::Refused`]; see its doc for `malformed`.
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, ServerStep> {
        let Some(challenge) = self.challenge else {
            return Err(not_authenticated("client-final-message before the server's challenge"));
        };
        let text = client_message_text(client_final)?;
        // The proof is the last attribute (RFC 5802 §7), and no value contains `,`.
        let Some((without_proof, proof_text)) = text.rsplit_once(",p=") else {
            return Err(malformed("client-final-message has no proof (p=)"));
        };
        let mut attributes = without_proof.split(',');
        let Some(binding_text) = attributes.next().and_then(|a| a.strip_prefix("c=")) else {
            return Err(malformed("client-final-message does not start with c=<channel binding>"));
        };
        let Some(nonce) = attributes.next().and_then(|a| a.strip_prefix("r=")) else {
            return Err(malformed("client-final-message has no nonce (r=) after c="));
        };
        for extension in attributes {
            check_extension(extension).map_err(malformed)?;
        }
        let Ok(binding) = BASE64.decode(binding_text) else {
            return Err(malformed("channel binding (c=) is not valid base64"));
        };
        if binding != self.gs2_header.as_bytes() {
            return Err(malformed("channel binding (c=) does not repeat the gs2 header"));
        }
        let Some(proof) = decode_key(proof_text) else {
            return Err(malformed("client proof (p=) is not 32 bytes in base64"));
        };
        // The nonces are public; a plain comparison leaks nothing.
        if nonce != challenge.combined_nonce {
            return Err(not_authenticated("nonce (r=) does not match the server's challenge"));
        }

        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, challenge.server_first);
        // ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage); the proof is right if
        // SHA-256(ClientKey) is the StoredKey. Done for unknown users too, so both take as long.
        let client_signature = hmac_sha256(&challenge.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        let proof_matches: bool = sha256(&client_key).ct_eq(&challenge.stored_key).into();
        let server_signature = hmac_sha256(&challenge.server_key, auth_message.as_bytes());
        if !challenge.user_known {
            return Err(not_authenticated("unknown user"));
        }
        if !proof_matches {
            return Err(not_authenticated("wrong password (client proof does not verify)"));
        }
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }
}

/// The client side, for tests and the bench tool.
///
/// Owner: the caller. Lifecycle: [`ClientExchange::new`] → [`ClientExchange::client_first`] →
/// [`ClientExchange::client_final`] → [`ClientExchange::verify_server_final`]. Holds the password
/// until dropped; `Debug` does not print it.
pub struct ClientExchange {
    /// `n,,` unless a test chooses another header.
    gs2_header: String,
    client_first_bare: String,
    client_nonce: String,
    password: Vec<u8>,
    /// Set by [`ClientExchange::client_final`]: the signature the server must send back.
    server_signature_expected: Option<Key>,
}

impl fmt::Debug for ClientExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientExchange")
            .field("client_first_bare", &self.client_first_bare)
            .field("answered", &self.server_signature_expected.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientExchange {
    /// Starts an exchange for `username` (`,` and `=` are escaped; no SASLprep) with a random
    /// nonce. Panics only if the operating system's random source fails.
    pub fn new(username: &str, password: &[u8]) -> ClientExchange {
        let random: [u8; NONCE_RANDOM_LEN_BYTES] = random_bytes();
        ClientExchange::with_nonce("n,,", username, password, &BASE64.encode(random))
    }

    /// An exchange with a given gs2 header and nonce (printable, no `,`).
    fn with_nonce(gs2_header: &str, username: &str, password: &[u8], nonce: &str) -> ClientExchange {
        let encoded_user = username.replace('=', "=3D").replace(',', "=2C");
        ClientExchange {
            gs2_header: gs2_header.to_string(),
            client_first_bare: format!("n={encoded_user},r={nonce}"),
            client_nonce: nonce.to_string(),
            password: password.to_vec(),
            server_signature_expected: None,
        }
    }

    /// The client-first-message: `n,,n=<user>,r=<nonce>`.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
    }

    /// Answers the server-first-message with the client-final-message
    /// `c=biws,r=<combined nonce>,p=<proof>`. Refuses a nonce that does not extend the client's,
    /// an iteration count outside [`ITERATIONS_MIN`]..=[`ITERATIONS_MAX`] and an `m=` extension.
    /// Costs one PBKDF2 with the server's iteration count.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        if server_first.len() > MESSAGE_LEN_MAX_BYTES {
            return Err(format!("server-first-message is over {MESSAGE_LEN_MAX_BYTES} bytes"));
        }
        let text =
            std::str::from_utf8(server_first).map_err(|_| "server-first-message is not UTF-8".to_string())?;
        let mut attributes = text.split(',');
        let first = attributes.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err("server-first-message has a mandatory extension (m=)".to_string());
        }
        let nonce = first
            .strip_prefix("r=")
            .ok_or_else(|| "server-first-message does not start with r=<nonce>".to_string())?;
        check_nonce(nonce).map_err(|reason| format!("server nonce: {reason}"))?;
        if nonce.len() <= self.client_nonce.len() || !nonce.starts_with(&self.client_nonce) {
            return Err("server nonce does not extend the client's nonce".to_string());
        }
        let salt_text = attributes
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .ok_or_else(|| "server-first-message has no salt (s=) after r=".to_string())?;
        let salt =
            BASE64.decode(salt_text).map_err(|_| "server salt (s=) is not valid base64".to_string())?;
        if salt.is_empty() || salt.len() > SALT_LEN_MAX_BYTES {
            return Err(format!("server salt is {} bytes; accepted: 1 to {SALT_LEN_MAX_BYTES}", salt.len()));
        }
        let iterations_text = attributes
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .ok_or_else(|| "server-first-message has no iteration count (i=) after s=".to_string())?;
        let iterations: u32 = iterations_text
            .parse()
            .map_err(|_| format!("server iteration count `{iterations_text}` is not a whole number"))?;
        if !(ITERATIONS_MIN..=ITERATIONS_MAX).contains(&iterations) {
            return Err(format!(
                "server iteration count {iterations} is outside {ITERATIONS_MIN}..={ITERATIONS_MAX}"
            ));
        }
        for extension in attributes {
            check_extension(extension).map_err(|reason| format!("server-first-message: {reason}"))?;
        }

        let keys = ClientKeys::derive(&self.password, &salt, iterations);
        let without_proof = format!("c={},r={nonce}", BASE64.encode(&self.gs2_header));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let client_signature = hmac_sha256(&keys.stored_key, auth_message.as_bytes());
        let proof = xor(&keys.client_key, &client_signature);
        self.server_signature_expected = Some(hmac_sha256(&keys.server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server's signature (mutual authentication): `v=<ServerSignature b64>`, compared
    /// in constant time. An `e=<error>` message is returned as an error naming it.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), String> {
        let Some(expected) = self.server_signature_expected else {
            return Err("server-final-message before the client-final-message".to_string());
        };
        if server_final.len() > MESSAGE_LEN_MAX_BYTES {
            return Err(format!("server-final-message is over {MESSAGE_LEN_MAX_BYTES} bytes"));
        }
        let text =
            std::str::from_utf8(server_final).map_err(|_| "server-final-message is not UTF-8".to_string())?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(format!("server refused the exchange: {}", error.escape_debug()));
        }
        let signature_text = text.split(',').next().unwrap_or_default();
        let signature = signature_text
            .strip_prefix("v=")
            .and_then(decode_key)
            .ok_or_else(|| "server-final-message is not v=<32 bytes in base64>".to_string())?;
        if bool::from(signature.ct_eq(&expected)) {
            Ok(())
        } else {
            Err("server signature does not verify: the server does not know this user's keys".to_string())
        }
    }
}

/// The keys a client derives from its password (RFC 5802 §3).
struct ClientKeys {
    client_key: Key,
    stored_key: Key,
    server_key: Key,
}

impl ClientKeys {
    fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ClientKeys {
        let mut salted_password: Key = [0; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted_password);
        let client_key = hmac_sha256(&salted_password, b"Client Key");
        ClientKeys {
            client_key,
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted_password, b"Server Key"),
        }
    }
}

/// Checks a client message's size and encoding before any parsing.
fn client_message_text(message: &[u8]) -> Result<&str, ServerStep> {
    if message.len() > MESSAGE_LEN_MAX_BYTES {
        return Err(malformed("SCRAM message is over 1 KiB"));
    }
    let Ok(text) = std::str::from_utf8(message) else {
        return Err(malformed("SCRAM message is not UTF-8"));
    };
    if text.contains('\0') {
        return Err(malformed("SCRAM message contains NUL"));
    }
    Ok(text)
}

/// Decodes a `saslname`: non-empty, `=2C` → `,`, `=3D` → `=`, any other `=` refused.
fn decode_saslname(encoded: &str) -> Result<String, &'static str> {
    if encoded.is_empty() {
        return Err("user name is empty");
    }
    let mut decoded = String::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some(position) = rest.find('=') {
        decoded.push_str(&rest[..position]);
        let escape = &rest[position..];
        if escape.starts_with("=2C") {
            decoded.push(',');
        } else if escape.starts_with("=3D") {
            decoded.push('=');
        } else {
            return Err("user name has an `=` that is not =2C or =3D");
        }
        rest = &escape[3..];
    }
    decoded.push_str(rest);
    Ok(decoded)
}

/// A nonce is non-empty printable ASCII without `,` (RFC 5802 §7 `printable`).
fn check_nonce(nonce: &str) -> Result<(), &'static str> {
    if nonce.is_empty() {
        return Err("nonce is empty");
    }
    if !nonce.bytes().all(|byte| (0x21..=0x7e).contains(&byte) && byte != b',') {
        return Err("nonce has a character that is not printable ASCII");
    }
    Ok(())
}

/// An optional extension is `<letter>=<value>`; unknown ones are ignored (RFC 5802 §5.1).
fn check_extension(attribute: &str) -> Result<(), &'static str> {
    let bytes = attribute.as_bytes();
    if bytes.len() < 3 || !bytes[0].is_ascii_alphabetic() || bytes[1] != b'=' {
        return Err("extension is not <letter>=<value>");
    }
    Ok(())
}

fn decode_key(text: &str) -> Option<Key> {
    BASE64.decode(text).ok()?.try_into().ok()
}

fn hmac_for(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Key {
    let mut mac = hmac_for(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

fn xor(left: &Key, right: &Key) -> Key {
    std::array::from_fn(|index| left[index] ^ right[index])
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    getrandom::getrandom(&mut bytes)
        .expect("the operating system's random source failed; SCRAM nonces and salts need it");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";

    fn rfc_credentials() -> ScramCredentials {
        let salt = BASE64.decode(RFC_SALT).unwrap();
        ScramCredentials::derive_with_salt(b"pencil", &salt, 4096)
    }

    /// Runs a whole exchange; the server's result and the client (to check the server-final).
    fn run(
        client: &mut ClientExchange,
        credentials: Option<&ScramCredentials>,
    ) -> Result<Vec<u8>, ServerStep> {
        let (mut server, _username) = ServerExchange::start(&client.client_first())?;
        let server_first = server.challenge(credentials);
        let client_final = client.client_final(&server_first).expect("client accepts server-first");
        server.finish(&client_final)
    }

    fn attribute<'a>(message: &'a [u8], name: &str) -> &'a str {
        let text = std::str::from_utf8(message).unwrap();
        text.split(',').find_map(|a| a.strip_prefix(name)).unwrap()
    }

    fn is_malformed(step: &ServerStep) -> bool {
        matches!(step, ServerStep::Refused { malformed: true, .. })
    }

    #[test]
    fn rfc7677_test_vector() {
        let credentials = rfc_credentials();
        let mut client = ClientExchange::with_nonce("n,,", "user", b"pencil", RFC_CLIENT_NONCE);
        assert_eq!(client.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");

        let (mut server, username) = ServerExchange::start(&client.client_first()).unwrap();
        assert_eq!(username, "user");
        let server_first = server.challenge_with_server_nonce(Some(&credentials), RFC_SERVER_NONCE);
        assert_eq!(
            String::from_utf8(server_first.clone()).unwrap(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let client_final = client.client_final(&server_first).unwrap();
        assert_eq!(
            String::from_utf8(client_final.clone()).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let server_final = server.finish(&client_final).unwrap();
        assert_eq!(
            String::from_utf8(server_final.clone()).unwrap(),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        client.verify_server_final(&server_final).unwrap();
    }

    #[test]
    fn round_trip_with_derived_credentials() {
        let credentials = ScramCredentials::derive(b"s3cret", ITERATIONS_DEFAULT);
        assert_eq!(credentials.salt.len(), SALT_LEN_BYTES);
        let mut client = ClientExchange::new("alice", b"s3cret");
        let server_final = run(&mut client, Some(&credentials)).unwrap();
        client.verify_server_final(&server_final).unwrap();

        // The text form survives the users file.
        let reparsed = ScramCredentials::parse(&credentials.to_string()).unwrap();
        assert_eq!(reparsed, credentials);
        let mut client = ClientExchange::new("alice", b"s3cret");
        let server_final = run(&mut client, Some(&reparsed)).unwrap();
        client.verify_server_final(&server_final).unwrap();
    }

    #[test]
    fn wrong_password_is_refused_and_not_malformed() {
        let credentials = ScramCredentials::derive(b"right", ITERATIONS_DEFAULT);
        let mut client = ClientExchange::new("alice", b"wrong");
        let refusal = run(&mut client, Some(&credentials)).unwrap_err();
        assert_eq!(
            refusal,
            ServerStep::Refused { malformed: false, reason: "wrong password (client proof does not verify)" }
        );
    }

    #[test]
    fn unknown_user_is_refused_at_finish_with_a_stable_challenge() {
        let real = ScramCredentials::derive(b"pw", ITERATIONS_DEFAULT);
        let challenge_for = |username: &str| {
            let client = ClientExchange::new(username, b"pw");
            let (mut server, _) = ServerExchange::start(&client.client_first()).unwrap();
            server.challenge(None)
        };
        let first = challenge_for("ghost");
        let second = challenge_for("ghost");
        let other = challenge_for("phantom");
        assert_eq!(attribute(&first, "s="), attribute(&second, "s="));
        assert_eq!(attribute(&first, "i="), attribute(&second, "i="));
        assert_ne!(attribute(&first, "r="), attribute(&second, "r="), "nonces stay fresh");
        assert_ne!(attribute(&first, "s="), attribute(&other, "s="));
        // Shaped like a real user's challenge.
        let salt = BASE64.decode(attribute(&first, "s=")).unwrap();
        assert_eq!(salt.len(), real.salt.len());
        assert_eq!(attribute(&first, "i="), real.iterations.to_string());

        // Start and challenge succeed; the refusal comes only at the end.
        let mut client = ClientExchange::new("ghost", b"pw");
        let refusal = run(&mut client, None).unwrap_err();
        assert_eq!(refusal, ServerStep::Refused { malformed: false, reason: "unknown user" });
    }

    #[test]
    fn tampered_nonce_and_proof_are_refused() {
        let credentials = ScramCredentials::derive(b"pw", ITERATIONS_DEFAULT);
        let exchange = |tamper: &dyn Fn(String) -> String| {
            let mut client = ClientExchange::new("bob", b"pw");
            let (mut server, _) = ServerExchange::start(&client.client_first()).unwrap();
            let server_first = server.challenge(Some(&credentials));
            let client_final = client.client_final(&server_first).unwrap();
            let tampered = tamper(String::from_utf8(client_final).unwrap());
            server.finish(tampered.as_bytes())
        };
        assert!(exchange(&|message| message).is_ok());
        // A nonce one character different (the proof is then also over other bytes).
        let refusal = exchange(&|message| message.replacen(",r=", ",r=X", 1)).unwrap_err();
        assert_eq!(
            refusal,
            ServerStep::Refused {
                malformed: false,
                reason: "nonce (r=) does not match the server's challenge"
            }
        );
        // A proof with one bit flipped.
        let refusal = exchange(&|message| {
            let (head, proof) = message.rsplit_once(",p=").unwrap();
            let mut proof = BASE64.decode(proof).unwrap();
            proof[0] ^= 1;
            format!("{head},p={}", BASE64.encode(proof))
        })
        .unwrap_err();
        assert!(matches!(refusal, ServerStep::Refused { malformed: false, .. }));
        // Channel binding that does not repeat the gs2 header `n,,`.
        let refusal = exchange(&|message| message.replacen("c=biws", "c=eSws", 1)).unwrap_err();
        assert!(is_malformed(&refusal), "{refusal:?}");
    }

    #[test]
    fn client_refuses_a_forged_server_signature() {
        let credentials = ScramCredentials::derive(b"pw", ITERATIONS_DEFAULT);
        let impostor = ScramCredentials { server_key: [7; 32], ..credentials.clone() };
        let mut client = ClientExchange::new("carol", b"pw");
        let server_final = run(&mut client, Some(&impostor)).unwrap();
        let error = client.verify_server_final(&server_final).unwrap_err();
        assert!(error.contains("does not verify"), "{error}");
    }

    #[test]
    fn gs2_header_y_and_authzid_equal_to_the_user() {
        let credentials = ScramCredentials::derive(b"pw", ITERATIONS_DEFAULT);
        for header in ["y,,", "n,a=dave,", "y,a=dave,"] {
            let mut client = ClientExchange::with_nonce(header, "dave", b"pw", "abc");
            let server_final = run(&mut client, Some(&credentials)).unwrap();
            client.verify_server_final(&server_final).unwrap();
        }
        let (mut server, _) = ServerExchange::start(b"y,,n=dave,r=abc").unwrap();
        server.challenge_with_server_nonce(Some(&credentials), "xyz");
        let refusal = server.finish(b"c=biws,r=abcxyz,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(is_malformed(&refusal.unwrap_err()), "y,, must bind as eSws");
    }

    #[test]
    fn user_names_escape_comma_and_equals() {
        let client = ClientExchange::new("a,b=c", b"pw");
        assert!(attribute(&client.client_first(), "n=") == "a=2Cb=3Dc");
        let (_, username) = ServerExchange::start(&client.client_first()).unwrap();
        assert_eq!(username, "a,b=c");
        let (_, username) = ServerExchange::start("n,,n=zoë=3D=2C,r=x".as_bytes()).unwrap();
        assert_eq!(username, "zoë=,");

        let credentials = ScramCredentials::derive(b"pw", ITERATIONS_DEFAULT);
        let mut client = ClientExchange::new("a,b=c", b"pw");
        let server_final = run(&mut client, Some(&credentials)).unwrap();
        client.verify_server_final(&server_final).unwrap();
    }

    #[test]
    fn malformed_client_first_messages_are_refused() {
        let oversized = format!("n,,n=user,r={}", "x".repeat(MESSAGE_LEN_MAX_BYTES));
        let cases: &[(&[u8], &str)] = &[
            (b"", "no gs2 header"),
            (b"n", "no gs2 header"),
            (b"n,", "not terminated"),
            (b"n,,", "does not start with n="),
            (b"x,,n=u,r=a", "not n, y or p="),
            (b"p=tls-unique,,n=u,r=a", "channel binding"),
            (b"n,b=u,n=u,r=a", "authzid is not a="),
            (b"n,a=other,n=u,r=a", "other than the user"),
            (b"n,a=,n=u,r=a", "user name is empty"),
            (b"n,,m=ext,n=u,r=a", "mandatory extension"),
            (b"n,,r=a,n=u", "does not start with n="),
            (b"n,,n=u", "no nonce"),
            (b"n,,n=u,x=a", "no nonce"),
            (b"n,,n=,r=a", "user name is empty"),
            (b"n,,n=a=2cb,r=a", "not =2C or =3D"),
            (b"n,,n=a=,r=a", "not =2C or =3D"),
            (b"n,,n=a=3,r=a", "not =2C or =3D"),
            (b"n,,n=u,r=", "nonce is empty"),
            (b"n,,n=u,r=a b", "not printable"),
            (b"n,,n=u,r=\xc3\xa9", "not printable"),
            (b"n,,n=u,r=a,", "extension"),
            (b"n,,n=u,r=a,bad", "extension"),
            (b"n,,n=u,r=a,1=x", "extension"),
            (b"n,,n=u\0,r=a", "NUL"),
            (b"n,,n=\xff,r=a", "not UTF-8"),
            (oversized.as_bytes(), "over 1 KiB"),
        ];
        for (message, expected) in cases {
            match ServerExchange::start(message) {
                Err(ServerStep::Refused { malformed: true, reason }) => assert!(
                    reason.contains(expected),
                    "{:?}: reason {reason:?} lacks {expected:?}",
                    String::from_utf8_lossy(message)
                ),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(message)),
            }
        }
        // Unknown extensions after the nonce are allowed and ignored.
        assert!(ServerExchange::start(b"n,,n=u,r=a,x=1").is_ok());
    }

    #[test]
    fn malformed_client_final_messages_are_refused() {
        let credentials = ScramCredentials::derive(b"pw", ITERATIONS_DEFAULT);
        let proof = BASE64.encode([0u8; 32]);
        let short_proof = BASE64.encode([0u8; 31]);
        let oversized = format!("c=biws,r=ab,x={},p={proof}", "y".repeat(MESSAGE_LEN_MAX_BYTES));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "no proof"),
            (b"c=biws".to_vec(), "no proof"),
            (b"c=biws,r=ab".to_vec(), "no proof"),
            (format!("r=ab,c=biws,p={proof}").into_bytes(), "does not start with c="),
            (format!("c=biws,p={proof}").into_bytes(), "no nonce"),
            (format!("c=biws,x=ab,p={proof}").into_bytes(), "no nonce"),
            (format!("c=biws,r=ab,7,p={proof}").into_bytes(), "extension"),
            (format!("c=!!!!,r=ab,p={proof}").into_bytes(), "not valid base64"),
            (format!("c=eSws,r=ab,p={proof}").into_bytes(), "does not repeat the gs2 header"),
            (b"c=biws,r=ab,p=***".to_vec(), "not 32 bytes"),
            (format!("c=biws,r=ab,p={short_proof}").into_bytes(), "not 32 bytes"),
            (format!("c=biws,r=ab,p={proof},x=1").into_bytes(), "not 32 bytes"),
            (format!("c=biws,r=ab,p={proof}\0").into_bytes(), "NUL"),
            (b"c=biws,r=ab,p=\xff".to_vec(), "not UTF-8"),
            (oversized.into_bytes(), "over 1 KiB"),
        ];
        for (message, expected) in cases {
            let (mut server, _) = ServerExchange::start(b"n,,n=u,r=a").unwrap();
            server.challenge_with_server_nonce(Some(&credentials), "b");
            match server.finish(&message) {
                Err(ServerStep::Refused { malformed: true, reason }) => assert!(
                    reason.contains(expected),
                    "{:?}: reason {reason:?} lacks {expected:?}",
                    String::from_utf8_lossy(&message)
                ),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&message)),
            }
        }
        // finish before challenge is a refusal, not a panic.
        let (server, _) = ServerExchange::start(b"n,,n=u,r=a").unwrap();
        let refusal = server.finish(format!("c=biws,r=ab,p={proof}").as_bytes()).unwrap_err();
        assert!(matches!(refusal, ServerStep::Refused { malformed: false, .. }));
    }

    #[test]
    fn client_refuses_bad_server_messages() {
        let salt = BASE64.encode([1u8; 16]);
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "does not start with r="),
            (format!("m=x,r=cnSN,s={salt},i=4096"), "mandatory extension"),
            (format!("r=other,s={salt},i=4096"), "does not extend"),
            (format!("r=cn,s={salt},i=4096"), "does not extend"),
            (format!("r=cn S,s={salt},i=4096"), "not printable"),
            ("r=cnSN,i=4096".to_string(), "no salt"),
            ("r=cnSN,s=,i=4096".to_string(), "0 bytes"),
            ("r=cnSN,s=!!,i=4096".to_string(), "not valid base64"),
            (format!("r=cnSN,s={},i=4096", BASE64.encode([0u8; 65])), "65 bytes"),
            (format!("r=cnSN,s={salt}"), "no iteration count"),
            (format!("r=cnSN,s={salt},i=abc"), "not a whole number"),
            (format!("r=cnSN,s={salt},i=-1"), "not a whole number"),
            (format!("r=cnSN,s={salt},i=4095"), "outside"),
            (format!("r=cnSN,s={salt},i=10000001"), "outside"),
            (format!("r=cnSN,s={salt},i=4096,?"), "extension"),
            (format!("r=cnSN,s={salt},i=4096,{}", "z".repeat(1024)), "over 1024"),
        ];
        for (message, expected) in cases {
            let mut client = ClientExchange::with_nonce("n,,", "u", b"pw", "cn");
            let error = client.client_final(message.as_bytes()).unwrap_err();
            assert!(error.contains(expected), "{message:?}: {error:?} lacks {expected:?}");
        }
        let mut client = ClientExchange::with_nonce("n,,", "u", b"pw", "cn");
        assert!(client.client_final(b"r=cn\xff").unwrap_err().contains("UTF-8"));

        let error = client.verify_server_final(b"v=AAAA").unwrap_err();
        assert!(error.contains("before the client-final"), "{error}");
        client.client_final(format!("r=cnSN,s={salt},i=4096").as_bytes()).unwrap();
        for (message, expected) in [
            (&b"e=invalid-proof"[..], "invalid-proof"),
            (b"v=AAAA", "not v=<32 bytes"),
            (b"x=1", "not v=<32 bytes"),
            (b"", "not v=<32 bytes"),
            (b"\xff", "UTF-8"),
        ] {
            let error = client.verify_server_final(message).unwrap_err();
            assert!(error.contains(expected), "{message:?}: {error:?} lacks {expected:?}");
        }
        let forged = format!("v={}", BASE64.encode([0u8; 32]));
        assert!(client.verify_server_final(forged.as_bytes()).unwrap_err().contains("does not verify"));
    }

    #[test]
    fn credentials_text_round_trip_and_format() {
        let credentials = rfc_credentials();
        let text = credentials.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"), "{text}");
        assert_eq!(ScramCredentials::parse(&text).unwrap(), credentials);
        // Debug keeps the keys out of logs.
        let debug = format!("{credentials:?}");
        assert!(!debug.contains(&BASE64.encode(credentials.server_key)), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
        // Iteration counts are brought within bounds.
        assert_eq!(ScramCredentials::derive(b"pw", 1).iterations, ITERATIONS_MIN);
    }

    #[test]
    fn credentials_parse_errors_name_the_part() {
        let key = BASE64.encode([9u8; 32]);
        let salt = BASE64.encode([1u8; 16]);
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "must start with"),
            (format!("SCRAM-SHA-1$4096:{salt}${key}:{key}"), "must start with"),
            (format!("scram-sha-256$4096:{salt}${key}:{key}"), "must start with"),
            (format!("SCRAM-SHA-256$4096:{salt}"), "no `$`"),
            (format!("SCRAM-SHA-256$4096{salt}${key}:{key}"), "missing a `:`"),
            (format!("SCRAM-SHA-256$4096:{salt}${key}{key}"), "missing a `:`"),
            (format!("SCRAM-SHA-256$abc:{salt}${key}:{key}"), "not a whole number"),
            (format!("SCRAM-SHA-256$ 4096:{salt}${key}:{key}"), "not a whole number"),
            (format!("SCRAM-SHA-256$99999999999:{salt}${key}:{key}"), "not a whole number"),
            (format!("SCRAM-SHA-256$4095:{salt}${key}:{key}"), "outside 4096..=10000000"),
            (format!("SCRAM-SHA-256$10000001:{salt}${key}:{key}"), "outside"),
            (format!("SCRAM-SHA-256$4096:${key}:{key}"), "salt is 0 bytes"),
            (format!("SCRAM-SHA-256$4096:not base64!${key}:{key}"), "salt is not valid base64"),
            (format!("SCRAM-SHA-256$4096:{}${key}:{key}", BASE64.encode([0u8; 65])), "salt is 65 bytes"),
            (format!("SCRAM-SHA-256$4096:{salt}$AAAA:{key}"), "StoredKey is not 32 bytes"),
            (format!("SCRAM-SHA-256$4096:{salt}${key}:AAAA"), "ServerKey is not 32 bytes"),
            (format!("SCRAM-SHA-256$4096:{salt}${key}:{key}$"), "ServerKey is not 32 bytes"),
            (format!("SCRAM-SHA-256$4096:{salt}${key}:{key}\n"), "ServerKey is not 32 bytes"),
        ];
        for (text, expected) in cases {
            let error = ScramCredentials::parse(&text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error:?} lacks {expected:?}");
            assert!(!error.contains(&key), "errors never repeat key material");
        }
        assert!(ScramCredentials::parse(&format!("SCRAM-SHA-256$4096:{salt}${key}:{key}")).is_ok());
    }

    /// SplitMix64: a seeded source for the never-panic tests, so a failure names its seed.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }

        /// Random bytes, biased towards the SCRAM alphabet so parsers get past the first check.
        fn bytes(&mut self, len_max: usize) -> Vec<u8> {
            const ALPHABET: &[u8] = b"nyp=,ar=cmsiv2C3D0123456789+/biwseSwsAB";
            let len = self.below(len_max + 1);
            (0..len)
                .map(|_| match self.below(4) {
                    0 => self.next() as u8,
                    _ => ALPHABET[self.below(ALPHABET.len())],
                })
                .collect()
        }

        /// A valid message with a few bytes flipped, inserted, removed, or cut off.
        fn mutate(&mut self, message: &[u8]) -> Vec<u8> {
            let mut message = message.to_vec();
            for _ in 0..1 + self.below(3) {
                let position = self.below(message.len() + 1);
                match self.below(4) {
                    0 if position < message.len() => message[position] = self.next() as u8,
                    1 => message.insert(position, b",=a1"[self.below(4)]),
                    2 if position < message.len() => {
                        message.remove(position);
                    }
                    _ => message.truncate(position),
                }
            }
            message
        }
    }

    /// Runs `case` for `count` seeds; a panic is reported with the seed that caused it.
    fn for_seeds(count: u64, case: impl Fn(&mut SplitMix)) {
        for seed in 0..count {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                case(&mut SplitMix(seed));
            }));
            assert!(outcome.is_ok(), "panicked with seed {seed}");
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let credentials = ScramCredentials::derive(b"pw", ITERATIONS_DEFAULT);
        let client_first = b"n,a=u=2Cv,n=u=2Cv,r=abc,x=1".to_vec();
        let valid_final = {
            let mut client = ClientExchange::with_nonce("n,a=u=2Cv,", "u,v", b"pw", "abc");
            let (mut server, _) = ServerExchange::start(&client_first).unwrap();
            let server_first = server.challenge_with_server_nonce(Some(&credentials), "def");
            client.client_final(&server_first).unwrap()
        };
        let credentials_text = credentials.to_string();

        for_seeds(3000, |random| {
            let message = match random.below(2) {
                0 => random.bytes(MESSAGE_LEN_MAX_BYTES + 64),
                _ => random.mutate(&client_first),
            };
            if let Ok((mut server, _)) = ServerExchange::start(&message) {
                let known = random.below(2) == 0;
                server.challenge_with_server_nonce(known.then_some(&credentials), "def");
                let client_final = match random.below(2) {
                    0 => random.bytes(200),
                    _ => random.mutate(&valid_final),
                };
                let _ = server.finish(&client_final);
            }
            let _ = ScramCredentials::parse(&String::from_utf8_lossy(
                &random.mutate(credentials_text.as_bytes()),
            ));
        });

        // The client side; the `i=4096` tail is kept so that no case runs a huge PBKDF2.
        let salt = BASE64.encode(&credentials.salt);
        let server_first_head = format!("r=abcdef,s={salt}");
        for_seeds(300, |random| {
            let mut client = ClientExchange::with_nonce("n,,", "u", b"pw", "abc");
            let mut server_first = random.mutate(server_first_head.as_bytes());
            server_first.extend_from_slice(b",i=4096");
            if client.client_final(&server_first).is_ok() {
                let _ = client.verify_server_final(&random.bytes(64));
            }
            let _ = client.client_final(&random.bytes(MESSAGE_LEN_MAX_BYTES + 64));
        });
    }
}
