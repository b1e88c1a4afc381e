//! [`AuthProvider`]: who may connect (and as which tenant), and what they may publish and
//! subscribe to. Built-ins: [`AllowAll`] and [`FileAuth`] (users with argon2id password hashes,
//! a tenant per user, ACL rules with `%c` / `%u` substitution, reloadable).
//!
//! Owner: shared read-only by every shard (`Arc<dyn AuthProvider>` in the config). `authenticate`
//! runs on the shard that accepted the socket, before the session's home shard is known (the
//! tenant is part of the placement); `authorize` runs on the session's home shard for each
//! PUBLISH and each SUBSCRIBE filter.
//!
//! Cost on the shard's loop: an argon2id verification takes milliseconds by design. `FileAuth`
//! verifies a (user, password) pair once and then remembers the success under a keyed hash of the
//! password (never the password), so reconnects cost a hash, not a verification; the first connect
//! of each user (and every wrong password) pays it on the accepting shard's thread.

use std::collections::HashSet;
use std::fmt;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use serde::Deserialize;
use shardmq_protocol::topic;

use crate::message::TenantId;

/// What a CONNECT presents.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The client's address (from the PROXY header on a listener that expects one).
    pub peer: Option<std::net::SocketAddr>,
    /// The tenant of the listener the client came through, for providers that do not name one.
    pub default_tenant: TenantId,
    /// The client certificate verified by a mutual-TLS listener: its subject and SANs.
    pub client_cert: Option<&'a crate::tls::ClientCert>,
}

/// The answer to a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Allow {
        tenant: TenantId,
    },
    /// Unknown user or wrong password: v5 0x86, 3.1.1 return code 4.
    BadCredentials,
    /// Known but not allowed to connect: v5 0x87, 3.1.1 return code 5.
    NotAuthorized,
    /// An enhanced-authentication method the provider does not support: v5 0x8C.
    BadAuthenticationMethod,
}

impl AuthDecision {
    /// The CONNACK reason code of a refusal (v5; the 3.x return code follows from it).
    pub fn reason_code(&self) -> shardmq_protocol::ReasonCode {
        use shardmq_protocol::ReasonCode;
        match self {
            AuthDecision::Allow { .. } => ReasonCode::Success,
            AuthDecision::BadCredentials => ReasonCode::BadUserNameOrPassword,
            AuthDecision::NotAuthorized => ReasonCode::NotAuthorized,
            AuthDecision::BadAuthenticationMethod => ReasonCode::BadAuthenticationMethod,
        }
    }

    /// The refusal's name in events and logs.
    pub fn name(&self) -> &'static str {
        match self {
            AuthDecision::Allow { .. } => "allowed",
            AuthDecision::BadCredentials => "bad credentials",
            AuthDecision::NotAuthorized => "not authorized",
            AuthDecision::BadAuthenticationMethod => "bad authentication method",
        }
    }
}

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

/// Who a session belongs to, for authorisation.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    pub tenant: TenantId,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
}

/// A decision that another thread will make (an HTTP call): the connection's task waits for it
/// without blocking its shard.
#[derive(Debug, Default)]
pub struct PendingDecision {
    decision: Mutex<Option<AuthDecision>>,
    waker: atomic_waker::AtomicWaker,
}

impl PendingDecision {
    /// Delivers the decision (from any thread) and wakes the waiting connection.
    pub fn complete(&self, decision: AuthDecision) {
        *self.decision.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision);
        self.waker.wake();
    }

    /// Waits for the decision.
    pub async fn wait(&self) -> AuthDecision {
        std::future::poll_fn(|cx| {
            if let Some(decision) = self.decision.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return std::task::Poll::Ready(decision);
            }
            self.waker.register(cx.waker());
            match self.decision.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(decision) => std::task::Poll::Ready(decision),
                None => std::task::Poll::Pending,
            }
        })
        .await
    }
}

/// A decision now, or one to wait for.
#[derive(Debug)]
pub enum Verdict {
    Now(AuthDecision),
    Later(std::sync::Arc<PendingDecision>),
}

/// Authentication and authorisation, chosen in config.
pub trait AuthProvider: fmt::Debug + Send + Sync {
    /// Decides a CONNECT (and its tenant).
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision;
    /// Starts deciding a CONNECT: providers that ask another service answer `Later`, so the
    /// shard's loop never waits on them. By default, `authenticate` now.
    fn begin(&self, credentials: &Credentials<'_>) -> Verdict {
        Verdict::Now(self.authenticate(credentials))
    }
    /// Whether `who` may publish to the topic, or subscribe to the filter (without `$share/...`).
    fn authorize(&self, who: &Principal<'_>, action: Action, topic_or_filter: &str) -> bool;
    /// Re-reads its configuration (SIGHUP, the admin API). Built-ins without one return Ok.
    fn reload(&self) -> Result<(), String> {
        Ok(())
    }
    /// Starts an enhanced authentication (MQTT 5: CONNECT with an Authentication Method, then
    /// AUTH packets) with `method`. `None`: the provider does not support the method, and the
    /// client is refused with 0x8C (bad authentication method). Each exchange's steps run on the
    /// shard's thread, so they must be quick (no I/O).
    fn start_enhanced(&self, _method: &str, _credentials: &Credentials<'_>) -> Option<Box<dyn EnhancedAuth>> {
        None
    }
    /// The tenant a client belongs to as far as the provider knows without authenticating it
    /// (the file provider: a known user's tenant), so a refusal is counted under that tenant.
    fn tenant_of(&self, _credentials: &Credentials<'_>) -> Option<TenantId> {
        None
    }
}

/// One enhanced-authentication exchange with one client (see [`AuthProvider::start_enhanced`]).
pub trait EnhancedAuth: fmt::Debug + Send {
    /// Takes the client's Authentication Data (from CONNECT first, then from each AUTH) and
    /// answers with the next step.
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep;
}

/// What an enhanced-authentication exchange answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send AUTH (0x18, continue authentication) with this data and wait for the client's AUTH.
    Continue(bytes::Bytes),
    /// The exchange is over: the decision, the data for the CONNACK (or the re-authentication's
    /// AUTH 0x00), and the name the client authenticated as (its username from then on).
    Done { decision: AuthDecision, data: Option<bytes::Bytes>, username: Option<String> },
}

/// Everyone connects to the default tenant and may do anything.
#[derive(Debug, Default)]
pub struct AllowAll;

impl AuthProvider for AllowAll {
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision {
        AuthDecision::Allow { tenant: credentials.default_tenant }
    }

    fn authorize(&self, _: &Principal<'_>, _: Action, _: &str) -> bool {
        true
    }
}

/// The file `FileAuth` reads (TOML).
///
/// ```toml
/// [[users]]
/// username = "alice"
/// password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # `shardmq passwd` writes these
/// tenant = 1                                           # default 0
///
/// [[acl]]
/// username = "alice"        # optional: the rule is for this user only
/// client_id = "sensor-7"    # optional: for this client id only
/// action = "publish"        # publish | subscribe | all
/// topic = "devices/%u/#"    # a filter; %u = username, %c = client id
/// permission = "allow"      # allow | deny
/// ```
///
/// Rules are tried in order; the first whose user, client id, action and topic match decides.
/// When no rule matches: allowed if the file has no rules at all, denied otherwise.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub users: Vec<FileUser>,
    #[serde(default)]
    pub acl: Vec<AclRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUser {
    pub username: String,
    pub password_hash: String,
    #[serde(default)]
    pub tenant: u32,
    /// SCRAM-SHA-256 credentials for MQTT 5 enhanced authentication (`shardmq passwd --scram`
    /// writes them): `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. Without them the
    /// user can only authenticate with the password.
    #[serde(default)]
    pub scram_sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    Publish,
    Subscribe,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub username: Option<String>,
    pub client_id: Option<String>,
    pub action: AclAction,
    pub topic: String,
    pub permission: Permission,
}

/// Users and ACL from a file; see [`AuthFile`].
pub struct FileAuth {
    path: PathBuf,
    inner: Arc<RwLock<AuthFile>>,
    /// Verified (username, keyed hash of the password) pairs, so a reconnect skips argon2.
    verified: Mutex<HashSet<(String, u64)>>,
    keys: std::collections::hash_map::RandomState,
}

impl fmt::Debug for FileAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileAuth").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Reads and checks an auth file: every hash must parse, every ACL filter must be valid.
pub fn read_auth_file(path: &Path) -> Result<AuthFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read auth file {}: {e}", path.display()))?;
    let file: AuthFile =
        toml::from_str(&text).map_err(|e| format!("bad auth file {}: {e}", path.display()))?;
    for user in &file.users {
        PasswordHash::new(&user.password_hash).map_err(|e| {
            format!("auth file {}: user {:?}: bad password hash: {e}", path.display(), user.username)
        })?;
    }
    for user in &file.users {
        if let Some(text) = &user.scram_sha256 {
            crate::scram::ScramCredentials::parse(text).map_err(|e| {
                format!("auth file {}: user {:?}: bad scram_sha256: {e}", path.display(), user.username)
            })?;
        }
    }
    for (index, rule) in file.acl.iter().enumerate() {
        let probe = rule.topic.replace("%u", "u").replace("%c", "c");
        topic::validate_topic_filter(&probe).map_err(|e| {
            format!("auth file {}: acl rule {}: topic {:?}: {e}", path.display(), index + 1, rule.topic)
        })?;
    }
    Ok(file)
}

impl FileAuth {
    pub fn load(path: impl Into<PathBuf>) -> Result<FileAuth, String> {
        let path = path.into();
        let file = read_auth_file(&path)?;
        Ok(FileAuth {
            path,
            inner: Arc::new(RwLock::new(file)),
            verified: Mutex::new(HashSet::new()),
            keys: std::collections::hash_map::RandomState::new(),
        })
    }

    fn password_key(&self, password: &[u8]) -> u64 {
        self.keys.hash_one(password)
    }
}

/// Whether ACL filter `allowed` covers everything filter `asked` can match (for SUBSCRIBE):
/// `#` covers the rest, `+` covers one level (but not a `#`), a word covers only itself.
fn covers(allowed: &str, asked: &str) -> bool {
    let mut a = allowed.split('/');
    let mut b = asked.split('/');
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(x), Some(y)) if x == y && x != "+" => {}
            _ => return false,
        }
    }
}

impl AuthProvider for FileAuth {
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision {
        let Some(username) = credentials.username else { return AuthDecision::BadCredentials };
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let Some(user) = inner.users.iter().find(|u| u.username == username) else {
            return AuthDecision::BadCredentials;
        };
        let tenant = TenantId(user.tenant);
        let Some(password) = credentials.password else {
            // No password: only a client certificate the listener verified, naming this user as
            // its common name, vouches for the client (mutual TLS).
            let by_cert = credentials.client_cert.is_some_and(|c| c.common_name.as_deref() == Some(username));
            return if by_cert { AuthDecision::Allow { tenant } } else { AuthDecision::BadCredentials };
        };
        let key = (username.to_string(), self.password_key(password));
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
            return AuthDecision::Allow { tenant };
        }
        let Ok(hash) = PasswordHash::new(&user.password_hash) else { return AuthDecision::BadCredentials };
        if Argon2::default().verify_password(password, &hash).is_err() {
            return AuthDecision::BadCredentials;
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: one entry per user and password that ever worked; cleared on reload.
        if verified.len() >= 100_000 {
            verified.clear();
        }
        verified.insert(key);
        AuthDecision::Allow { tenant }
    }

    fn authorize(&self, who: &Principal<'_>, action: Action, asked: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        evaluate_acl(&inner.acl, who, action, asked)
    }

    fn start_enhanced(&self, method: &str, _credentials: &Credentials<'_>) -> Option<Box<dyn EnhancedAuth>> {
        (method == crate::scram::METHOD)
            .then(|| Box::new(FileScram { file: self.inner.clone(), phase: ScramPhase::Start }) as _)
    }

    fn tenant_of(&self, credentials: &Credentials<'_>) -> Option<TenantId> {
        let username = credentials.username?;
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.users.iter().find(|u| u.username == username).map(|u| TenantId(u.tenant))
    }

    fn reload(&self) -> Result<(), String> {
        let file = read_auth_file(&self.path)?;
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = file;
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }
}

/// A SCRAM-SHA-256 exchange of the file provider: the client's first message names the user, the
/// user's stored credentials answer the challenge, the client's proof decides.
#[derive(Debug)]
struct FileScram {
    file: Arc<RwLock<AuthFile>>,
    phase: ScramPhase,
}

#[derive(Debug)]
enum ScramPhase {
    Start,
    /// Challenged; the user (`None`: unknown, or without SCRAM credentials: refused at the end).
    Challenged {
        exchange: Box<crate::scram::ServerExchange>,
        username: String,
        tenant: Option<TenantId>,
    },
    Over,
}

impl EnhancedAuth for FileScram {
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep {
        use crate::scram::{ScramCredentials, ServerExchange, ServerStep};
        let refused = |step: ServerStep| {
            let decision = match step {
                ServerStep::Refused { malformed: true, .. } => AuthDecision::BadAuthenticationMethod,
                _ => AuthDecision::BadCredentials,
            };
            AuthStep::Done { decision, data: None, username: None }
        };
        match std::mem::replace(&mut self.phase, ScramPhase::Over) {
            ScramPhase::Start => {
                let (mut exchange, username) = match ServerExchange::start(data.unwrap_or_default()) {
                    Ok(started) => started,
                    Err(step) => return refused(step),
                };
                let (credentials, tenant) = {
                    let file = self.file.read().unwrap_or_else(|e| e.into_inner());
                    let user = file.users.iter().find(|u| u.username == username);
                    let credentials = user
                        .and_then(|u| u.scram_sha256.as_deref())
                        .and_then(|t| ScramCredentials::parse(t).ok());
                    (credentials, user.map(|u| TenantId(u.tenant)))
                };
                let challenge = exchange.challenge(credentials.as_ref());
                let tenant = tenant.filter(|_| credentials.is_some());
                self.phase = ScramPhase::Challenged { exchange: Box::new(exchange), username, tenant };
                AuthStep::Continue(bytes::Bytes::from(challenge))
            }
            ScramPhase::Challenged { exchange, username, tenant } => {
                match (exchange.finish(data.unwrap_or_default()), tenant) {
                    (Ok(server_final), Some(tenant)) => AuthStep::Done {
                        decision: AuthDecision::Allow { tenant },
                        data: Some(bytes::Bytes::from(server_final)),
                        username: Some(username),
                    },
                    (Ok(_), None) => {
                        refused(ServerStep::Refused { malformed: false, reason: "unknown user" })
                    }
                    (Err(step), _) => refused(step),
                }
            }
            ScramPhase::Over => {
                AuthStep::Done { decision: AuthDecision::NotAuthorized, data: None, username: None }
            }
        }
    }
}

/// Evaluates ACL rules in order: the first whose user, client id, action and topic match decides;
/// no rules at all allow everything, and when rules exist but none matches the answer is deny.
pub fn evaluate_acl(rules: &[AclRule], who: &Principal<'_>, action: Action, asked: &str) -> bool {
    if rules.is_empty() {
        return true;
    }
    for rule in rules {
        if rule.username.as_deref().is_some_and(|u| Some(u) != who.username) {
            continue;
        }
        if rule.client_id.as_deref().is_some_and(|c| c != who.client_id) {
            continue;
        }
        let action_matches = match rule.action {
            AclAction::All => true,
            AclAction::Publish => action == Action::Publish,
            AclAction::Subscribe => action == Action::Subscribe,
        };
        if !action_matches {
            continue;
        }
        if rule.topic.contains("%u") && who.username.is_none() {
            continue;
        }
        // A substituted value with wildcard characters or separators never widens the rule.
        let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
        if (rule.topic.contains("%u") && who.username.is_some_and(unsafe_value))
            || (rule.topic.contains("%c") && unsafe_value(who.client_id))
        {
            continue;
        }
        let filter = rule.topic.replace("%u", who.username.unwrap_or("")).replace("%c", who.client_id);
        let matches = match action {
            Action::Publish => topic::matches(&filter, asked),
            Action::Subscribe => covers(&filter, asked),
        };
        if matches {
            return rule.permission == Permission::Allow;
        }
    }
    false
}

/// A new argon2id PHC hash of `password` (OWASP parameters: 19 MiB, 2 passes), for `shardmq passwd`.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    use argon2::password_hash::rand_core::OsRng;
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password, &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_coverage() {
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/+/c", "a/b/c"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/b", "a/b/c"));
        assert!(covers("#", "x/y"));
        assert!(!covers("a/+", "a/b/c"));
    }

    #[test]
    fn hashes_verify_and_wrong_passwords_do_not() {
        let dir = std::env::temp_dir().join(format!("shardmq-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users.toml");
        let hash = hash_password(b"pw").unwrap();
        let text = format!(
            "[[users]]\nusername = \"alice\"\npassword_hash = \"{hash}\"\ntenant = 3\n\n\
             [[acl]]\nusername = \"alice\"\naction = \"all\"\ntopic = \"home/%u/#\"\npermission = \"allow\"\n\n\
             [[acl]]\naction = \"subscribe\"\ntopic = \"dev/%c/+\"\npermission = \"allow\"\n"
        );
        std::fs::write(&path, text).unwrap();
        let auth = FileAuth::load(&path).unwrap();
        let creds = |u, p| Credentials {
            client_id: "c1",
            username: Some(u),
            password: Some(p),
            peer: None,
            default_tenant: TenantId::default(),
            client_cert: None,
        };
        assert_eq!(auth.authenticate(&creds("alice", b"pw")), AuthDecision::Allow { tenant: TenantId(3) });
        // No password: only a verified client certificate naming the user stands in for it.
        let cert = |cn: &str| crate::tls::ClientCert {
            subject: format!("CN={cn}"),
            common_name: Some(cn.to_string()),
            sans: Vec::new(),
        };
        let (alice, bob) = (cert("alice"), cert("bob"));
        for (cert, want) in [
            (Some(&alice), AuthDecision::Allow { tenant: TenantId(3) }),
            (Some(&bob), AuthDecision::BadCredentials),
            (None, AuthDecision::BadCredentials),
        ] {
            let credentials = Credentials { password: None, client_cert: cert, ..creds("alice", b"") };
            assert_eq!(auth.authenticate(&credentials), want, "{cert:?}");
        }
        // Cached: the second success skips argon2 and gives the same answer.
        assert_eq!(auth.authenticate(&creds("alice", b"pw")), AuthDecision::Allow { tenant: TenantId(3) });
        assert_eq!(auth.authenticate(&creds("alice", b"nope")), AuthDecision::BadCredentials);
        assert_eq!(auth.authenticate(&creds("bob", b"pw")), AuthDecision::BadCredentials);
        let who = Principal { tenant: TenantId(3), client_id: "c1", username: Some("alice") };
        assert!(auth.authorize(&who, Action::Publish, "home/alice/lamp"));
        assert!(!auth.authorize(&who, Action::Publish, "home/bob/lamp"));
        assert!(auth.authorize(&who, Action::Subscribe, "dev/c1/x"));
        assert!(!auth.authorize(&who, Action::Subscribe, "dev/c1/#"));
        assert!(!auth.authorize(&who, Action::Publish, "dev/c1/x"), "subscribe-only rule");
        let sneaky = Principal { tenant: TenantId(3), client_id: "#", username: Some("alice") };
        assert!(
            !auth.authorize(&sneaky, Action::Subscribe, "dev/x/y"),
            "a wildcard client id never widens a rule"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
