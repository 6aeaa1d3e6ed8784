//! Chaos (issue 17): the operator is killed (SIGKILL) at random moments
//! while AgentTokens are minted and rotated, for each issuer kind. Once a
//! last operator has run until quiet, every token the ISSUER says it issued
//! is in an AgentToken's Secret (current key or `.previous`), revoked at the
//! issuer, or covered by an `Unknown` ledger entry (a token the operator
//! could not find, valid at most until the entry's `expiresAt`). Leaked
//! (active at the issuer, in no Secret, not `Unknown`) must be 0. The
//! ledger is read all along and must say which token is which: it never
//! says `Revoked` of a token the issuer still honours, it calls `Revoked`
//! every token the issuer revoked, the Secret's tokens are its `Live` and
//! `Grace` ones, and no revision carries two fingerprints or is minted
//! twice at the issuer. Once every AgentToken is deleted (operator
//! running), only `Unknown` tokens may still be active.
//!
//! The issuers' own records are the truth:
//! - the webhook STAND-IN knows every token it minted, for whom (its mint
//!   body names namespace, AgentToken and revision) and whether it is
//!   revoked or expired. It answers a mint after a random delay, so kills
//!   land between "minted" and "the operator heard of it";
//! - serviceAccount (real TokenRequest): each token is bound to a binding
//!   Secret and dies with it. The test watches binding Secrets (each holds
//!   at most one token; one deleted is a token revoked), reads from each
//!   delivered token's claims which binding it is bound to, and asks
//!   TokenReview at the end. It also reads every Secret twice a second: no
//!   Secret may hold a token whose binding is gone, nor a token the ledger
//!   never named by fingerprint;
//! - the real OpenBao: a declarative file audit device (accessors in clear,
//!   token values HMAC'd) records every child token created, with the
//!   metadata the operator gives it (AgentToken, revision); the token store
//!   says which are still alive;
//! - the REAL oidc-provider (oauth2, client credentials): the test server
//!   stores every access token it issues and lists them on a test endpoint;
//!   introspection (RFC 7662) says which are active. It answers a token
//!   request up to 1 s after storing the token;
//! - the GitHub App STAND-IN records every installation token it minted and
//!   whether it is revoked, and answers a mint up to 1 s late. Neither
//!   oauth2 nor GitHub knows which AgentToken a token was for: tokens are
//!   matched to the ledger by fingerprint, and an active token in no Secret
//!   that no entry names needs an `Unknown` entry without a fingerprint (an
//!   interrupted mint) of its own, valid at least as long;
//! - jwt: the operator signs the tokens itself and nothing can revoke them,
//!   so the truth is what was delivered: every JWT ever seen in a Secret
//!   must be named in the ledger, honestly (`Live`/`Grace` while in the
//!   Secret, never `Revoked`, `NotSupported` once out, `expiresAt` not
//!   before its `exp`), its claims naming its AgentToken. A JWT signed and
//!   never delivered is invisible to it; see that test.
//!
//! The short version runs in `make test`; `make chaos` runs the long one.
//! Knobs (environment): CHAOS_AGENTTOKENS (per issuer kind, default 20),
//! CHAOS_KILLS (5), CHAOS_SEED (random; printed), CHAOS_CHURN_SECS (5 per
//! kill), CHAOS_SETTLE_SECS. The seed fixes the test's own choices (when to
//! kill, how long the operator stays down, which AgentToken to rotate); the
//! operator's and the control plane's timing are not seeded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use agent_token_operator::controller::ledger::life;
use agent_token_operator::crd::{AgentToken, HistoryEntry, TokenLife};
use agent_token_operator::labels;
use agent_token_operator::rotation::fingerprint;

use crate::support::{Operator, SA_ISSUER, TestNamespace, applied, repo_root};
use crate::vault::OpenBao;
use crate::webhook::StandIn;

/// How big a run is and how it is paced.
struct Plan {
    agenttokens: usize,
    kills: usize,
    seed: u64,
    /// How long AgentTokens are rotated while the operator is killed.
    churn: Duration,
    /// How long the last operator may take to reach quiet (and, later, to
    /// finish deleting every AgentToken).
    settle: Duration,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

impl Plan {
    fn new(kind: &str) -> Plan {
        let agenttokens = env_u64("CHAOS_AGENTTOKENS").unwrap_or(20) as usize;
        let kills = env_u64("CHAOS_KILLS").unwrap_or(5) as usize;
        let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| rand::rng().random());
        let churn = Duration::from_secs(env_u64("CHAOS_CHURN_SECS").unwrap_or(5 * kills as u64));
        let settle = Duration::from_secs(
            env_u64("CHAOS_SETTLE_SECS").unwrap_or(90 + agenttokens as u64 / 2),
        );
        println!(
            "chaos {kind}: seed {seed} (CHAOS_SEED={seed} repeats the test's choices), \
             {agenttokens} AgentTokens, {kills} kills over {}s",
            churn.as_secs()
        );
        Plan {
            agenttokens,
            kills,
            seed,
            churn,
            settle,
        }
    }
}

/// The least time the last operator runs before the tally counts.
const MIN_LAST_RUN: Duration = Duration::from_secs(5);

/// What the ledger was seen to say, over every read of the run.
#[derive(Default)]
struct Observed {
    /// (AgentToken, revision) -> every fingerprint the ledger gave it.
    fingerprints: BTreeMap<(String, i64), BTreeSet<String>>,
    /// (AgentToken, revision) -> the entry as first seen `Revoked`.
    revoked: BTreeMap<(String, i64), HistoryEntry>,
    /// (AgentToken, revision) of Vault mints the operator searched for
    /// twice, completely, and did not find: a token revoked by a search
    /// whose result a kill kept from the ledger is gone, and the ledger
    /// says so ("... or the token is gone"), without calling it Revoked.
    gone: BTreeSet<(String, i64)>,
    reads: usize,
}

impl Observed {
    fn see(&mut self, ats: &[AgentToken]) {
        self.reads += 1;
        for at in ats {
            let name = at.name_any();
            for e in at.status.iter().flat_map(|s| &s.history) {
                let key = (name.clone(), e.revision);
                // Entries adopted from a binding have no fingerprint of a
                // token, only words saying so.
                if e.fingerprint.starts_with("sha256:") {
                    self.fingerprints
                        .entry(key.clone())
                        .or_default()
                        .insert(e.fingerprint.clone());
                }
                if e.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with(agent_token_operator::issuer::vault::NOT_FOUND))
                    && life(e) == TokenLife::Failed
                    && e.next_attempt_at.is_none()
                {
                    self.gone.insert(key.clone());
                }
                if life(e) == TokenLife::Revoked {
                    self.revoked.entry(key).or_insert_with(|| e.clone());
                }
            }
        }
    }

    /// Revisions the ledger gave more than one fingerprint.
    fn two_fingerprints(&self) -> Vec<String> {
        self.fingerprints
            .iter()
            .filter(|(_, fps)| fps.len() > 1)
            .map(|((name, rev), fps)| format!("{name} r{rev}: {fps:?}"))
            .collect()
    }
}

/// One read of the AgentTokens and their Secrets.
struct Snapshot {
    ats: Vec<AgentToken>,
    /// AgentToken name -> its Secret.
    secrets: HashMap<String, Secret>,
}

/// Which key of the Secret a token is in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Current,
    Previous,
}

impl Snapshot {
    async fn read(ns: &TestNamespace) -> Option<Snapshot> {
        let ats = ns
            .api::<AgentToken>()
            .list(&ListParams::default())
            .await
            .ok()?
            .items;
        let all = ns
            .api::<Secret>()
            .list(&ListParams::default())
            .await
            .ok()?
            .items;
        Some(Snapshot::of(ats, all))
    }

    /// The AgentTokens with their Secrets, found among `all`.
    fn of(ats: Vec<AgentToken>, all: Vec<Secret>) -> Snapshot {
        let all: HashMap<String, Secret> = all.into_iter().map(|s| (s.name_any(), s)).collect();
        let secrets = ats
            .iter()
            .filter_map(|at| Some((at.name_any(), all.get(&at.secret_name())?.clone())))
            .collect();
        Snapshot { ats, secrets }
    }

    /// [`Snapshot::read`], retried for up to 30 s.
    async fn read_soon(ns: &TestNamespace) -> Snapshot {
        for _ in 0..30 {
            if let Some(s) = Snapshot::read(ns).await {
                return s;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("could not read the AgentTokens and Secrets for 30 s");
    }

    fn at(&self, name: &str) -> Option<&AgentToken> {
        self.ats.iter().find(|a| a.name_any() == name)
    }

    fn entry(&self, name: &str, revision: i64) -> Option<&HistoryEntry> {
        self.at(name)?
            .status
            .as_ref()?
            .history
            .iter()
            .find(|e| e.revision == revision)
    }

    /// AgentToken `name`'s entry that names the token `fp`.
    fn entry_of(&self, name: &str, fp: &str) -> Option<&HistoryEntry> {
        self.at(name)?
            .status
            .as_ref()?
            .history
            .iter()
            .find(|e| e.fingerprint == fp)
    }

    /// Every ledger entry: (AgentToken, entry).
    fn entries(&self) -> impl Iterator<Item = (String, &HistoryEntry)> {
        self.ats.iter().flat_map(|at| {
            at.status
                .iter()
                .flat_map(|s| &s.history)
                .map(move |e| (at.name_any(), e))
        })
    }

    /// The tokens in AgentToken `name`'s Secret (values stay in memory,
    /// never printed).
    fn tokens(&self, name: &str) -> Vec<(Slot, String)> {
        let Some(at) = self.at(name) else {
            return Vec::new();
        };
        let Some(data) = self.secrets.get(name).and_then(|s| s.data.as_ref()) else {
            return Vec::new();
        };
        let key = at.secret_key();
        [
            (Slot::Current, key.clone()),
            (Slot::Previous, format!("{key}.previous")),
        ]
        .into_iter()
        .filter_map(|(slot, k)| {
            let v = String::from_utf8(data.get(&k)?.0.clone()).ok()?;
            (!v.is_empty()).then_some((slot, v))
        })
        .collect()
    }

    /// AgentToken name -> fingerprints of the tokens its Secret holds.
    fn fingerprints(&self) -> HashMap<String, BTreeSet<String>> {
        self.ats
            .iter()
            .map(|at| {
                let name = at.name_any();
                let fps = self
                    .tokens(&name)
                    .iter()
                    .map(|(_, v)| fingerprint(v.as_bytes()))
                    .collect();
                (name, fps)
            })
            .collect()
    }

    /// Why the AgentTokens are not quiet yet (empty: quiet): each has a
    /// token, Ready=True, and no mint or revocation in flight.
    fn unquiet(&self, expected: usize) -> Vec<String> {
        let mut why = Vec::new();
        if self.ats.len() != expected {
            why.push(format!(
                "{} AgentTokens, {expected} expected",
                self.ats.len()
            ));
        }
        for at in &self.ats {
            let name = at.name_any();
            let Some(st) = at.status.as_ref() else {
                why.push(format!("{name}: no status"));
                continue;
            };
            if st.revision < 1 {
                why.push(format!("{name}: no token yet"));
            }
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready");
            if ready.is_none_or(|c| c.status != "True") {
                why.push(format!(
                    "{name}: Ready={}",
                    ready.map_or("none".into(), |c| format!("{} {}", c.status, c.reason))
                ));
            }
            for e in &st.history {
                let l = life(e);
                if matches!(l, TokenLife::Minting | TokenLife::Revoking)
                    || (l == TokenLife::Failed && e.next_attempt_at.is_some())
                {
                    why.push(format!("{name} r{}: {l:?}", e.revision));
                }
            }
        }
        why
    }

    /// The ledger and the Secret agree: the Secret's current token is the
    /// ledger's `Live` one (and `status.revision` and `tokenFingerprint`
    /// name it), its previous
    /// token the `Grace` one.
    fn disagreements(&self) -> Vec<String> {
        let mut out = Vec::new();
        for at in &self.ats {
            let name = at.name_any();
            let Some(st) = at.status.as_ref() else {
                continue;
            };
            let top = |l: TokenLife| {
                st.history
                    .iter()
                    .filter(|e| life(e) == l)
                    .max_by_key(|e| e.revision)
            };
            let held: HashMap<_, _> = self
                .tokens(&name)
                .into_iter()
                .map(|(slot, v)| (format!("{slot:?}"), fingerprint(v.as_bytes())))
                .collect();
            let live = top(TokenLife::Live).map(|e| e.fingerprint.clone());
            let grace = top(TokenLife::Grace).map(|e| e.fingerprint.clone());
            if held.get("Current") != live.as_ref() {
                out.push(format!(
                    "{name}: the Secret's token is {:?}, the ledger's Live entry {live:?}",
                    held.get("Current")
                ));
            }
            if let Some(top) = top(TokenLife::Live)
                && st.revision != top.revision
            {
                out.push(format!(
                    "{name}: status.revision {}, the Live entry r{}",
                    st.revision, top.revision
                ));
            }
            if live.is_some() && st.token_fingerprint != live {
                out.push(format!(
                    "{name}: status.tokenFingerprint {:?}, the Live entry {live:?}",
                    st.token_fingerprint
                ));
            }
            if held.get("Previous") != grace.as_ref() {
                out.push(format!(
                    "{name}: the Secret's previous token is {:?}, the ledger's Grace entry {grace:?}",
                    held.get("Previous")
                ));
            }
        }
        out
    }
}

/// An entry that accounts for a token the operator could not find:
/// `Unknown`, or `Expired` after being `Unknown`.
fn covers_unknown(e: &HistoryEntry) -> bool {
    match life(e) {
        TokenLife::Unknown => true,
        TokenLife::Expired => e
            .message
            .as_deref()
            .is_some_and(|m| m.contains("during this mint")),
        _ => false,
    }
}

/// A ledger entry in a line (fingerprints, never tokens).
fn describe(e: Option<&HistoryEntry>) -> String {
    match e {
        None => "no entry".into(),
        Some(e) => format!(
            "r{} {:?} {} handle={:?} expiresAt={:?} attempts={} message={:?}",
            e.revision,
            life(e),
            e.fingerprint,
            e.handle,
            e.expires_at.as_ref().map(|t| t.0.to_string()),
            e.attempts,
            e.message
        ),
    }
}

/// What an issuer's records say about the tokens it issued.
#[derive(Default)]
struct Tally {
    issued: usize,
    in_secrets: usize,
    revoked: usize,
    unknown: usize,
    /// Died on their own (past their expiry at the issuer).
    expired: usize,
    /// Out of every Secret and valid until their expiry, because nobody
    /// can revoke them (jwt); the ledger says `NotSupported`.
    unrevocable: usize,
    /// Active at the issuer, in no Secret, not accounted `Unknown`.
    leaked: Vec<String>,
    /// Anything else that must not hold once quiet.
    problems: Vec<String>,
    /// Revisions (AgentToken, revision) whose token is `Unknown`.
    unknown_keys: BTreeSet<(String, i64)>,
}

/// An issuer kind under chaos: its own view of what it issued.
trait Issuer {
    /// The test names say what is real: "webhook stand-in", ...
    fn kind(&self) -> &'static str;
    /// The issuer's records against a snapshot of AgentTokens and Secrets.
    async fn account(&mut self, snap: &Snapshot) -> Tally;
    /// Entries the ledger showed `Revoked` whose token the issuer still
    /// honours (or that name a token other than the entry's).
    async fn revoked_but_active(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String>;
    /// Tokens the issuer revoked (not expired) that the ledger was never
    /// seen to call `Revoked`: the ledger must say which token is dead.
    async fn revoked_unrecorded(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String>;
    /// Revisions the issuer minted more than one token for.
    async fn minted_twice(&mut self) -> Vec<String>;
    /// Tokens in the snapshot's Secrets that the issuer does not honour
    /// (asking costs a call each, so this is done once):
    /// (AgentToken, fingerprint, why).
    async fn not_honoured(&mut self, snap: &Snapshot) -> Vec<(String, String, String)>;
    /// What else this issuer watched during the run, against what the
    /// ledger was seen to say: (lines printed with the counts, failures).
    /// Asked once, after settling, before the AgentTokens are deleted.
    fn watched(&mut self, _observed: &Observed) -> (Vec<String>, Vec<String>) {
        (Vec::new(), Vec::new())
    }
    /// Tokens still active once every AgentToken is deleted, outside `unknown`.
    async fn active_after_deletion(&mut self, unknown: &BTreeSet<(String, i64)>) -> Vec<String>;
}

/// One chaos run in its own namespace, with the operator's namespace apart.
struct Run {
    // Dropped in this order: the operator first, then the namespaces.
    op: Option<Operator>,
    observer: Option<tokio::task::JoinHandle<()>>,
    ns: TestNamespace,
    home: TestNamespace,
    plan: Plan,
    rng: StdRng,
    started: Instant,
    starts: usize,
    kills: usize,
    rotations: usize,
    observed: Arc<Mutex<Observed>>,
    names: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(o) = self.observer.take() {
            o.abort();
        }
    }
}

impl Run {
    async fn new(kind: &str, prefix: &str) -> Run {
        // Issuers are applied before the first operator starts.
        crate::support::install_crds();
        let plan = Plan::new(kind);
        let ns = TestNamespace::new(prefix).await;
        let home = TestNamespace::new("chaos-op").await;
        let rng = StdRng::seed_from_u64(plan.seed);
        let names = (0..plan.agenttokens)
            .map(|i| format!("at-{i:03}"))
            .collect();
        Run {
            op: None,
            observer: None,
            ns,
            home,
            plan,
            rng,
            started: Instant::now(),
            starts: 0,
            kills: 0,
            rotations: 0,
            observed: Arc::default(),
            names,
        }
    }

    fn start_operator(&mut self) {
        self.op = Some(Operator::start_with(
            &self.ns.name,
            &format!("chaos-{}", self.starts),
            &[
                "--leader-election=false",
                "--lease-namespace",
                &self.home.name,
            ],
        ));
        self.starts += 1;
    }

    /// Reads the ledger twice a second from now on.
    fn observe(&mut self) {
        let api: Api<AgentToken> = self.ns.api();
        let observed = self.observed.clone();
        self.observer = Some(tokio::spawn(async move {
            loop {
                if let Ok(list) = api.list(&ListParams::default()).await {
                    observed.lock().unwrap().see(&list.items);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }

    /// The AgentTokens: `spec(i)` is each one's spec; every other one keeps
    /// its previous token for 5 s after a rotation, the rest 0 s.
    fn create(&self, spec: impl Fn(usize) -> Value) {
        let docs: Vec<String> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut s = spec(i);
                s["previousTokenGracePeriod"] = json!(if i % 2 == 0 { "0s" } else { "5s" });
                json!({
                    "apiVersion": "agenttoken.dev/v1alpha1",
                    "kind": "AgentToken",
                    "metadata": {"name": name},
                    "spec": s,
                })
                .to_string()
            })
            .collect();
        applied(&self.ns, &docs.join("\n---\n"));
    }

    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Forces rotations at random while the operator is killed K times at
    /// random moments (the first during the first mints) and started again.
    async fn churn(&mut self) {
        let api: Api<AgentToken> = self.ns.api();
        let avg = self.plan.churn.as_secs_f64() / self.plan.kills.max(1) as f64;
        let per_tick = self.plan.agenttokens.div_ceil(40).max(1);
        for k in 0..self.plan.kills {
            let run_for = if k == 0 {
                self.rng.random_range(0.2..2.5)
            } else {
                self.rng.random_range(0.2 * avg..1.8 * avg)
            };
            let until = Instant::now() + Duration::from_secs_f64(run_for);
            while Instant::now() < until {
                for _ in 0..per_tick {
                    let i = self.rng.random_range(0..self.names.len());
                    self.rotations += 1;
                    let value = format!("chaos-{}", self.rotations);
                    let patch = json!({"metadata": {"annotations": {labels::ROTATE: value}}});
                    // A busy control plane may refuse one; the next tick
                    // asks again.
                    if let Err(e) = api
                        .patch(
                            &self.names[i],
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await
                    {
                        println!("  rotate {}: {e}", self.names[i]);
                    }
                }
                let pause = self.rng.random_range(50..400);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            if let Some(op) = self.op.as_mut() {
                op.kill();
            }
            self.kills += 1;
            let down = self.rng.random_range(0..1500);
            println!(
                "  kill {} at {:.1}s (operator down {down} ms)",
                self.kills,
                self.secs()
            );
            tokio::time::sleep(Duration::from_millis(down)).await;
            self.start_operator();
        }
    }

    /// Lets the last operator run until the AgentTokens are quiet and the
    /// issuer's records account for every token; panics with the evidence
    /// when that does not happen within the plan's settle time.
    async fn settle<I: Issuer>(&mut self, issuer: &mut I) -> Tally {
        let since = Instant::now();
        let deadline = since + self.plan.settle;
        let mut good_before = false;
        let mut next_note = Duration::from_secs(10);
        loop {
            let snap = match Snapshot::read(&self.ns).await {
                Some(s) => s,
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.observed.lock().unwrap().see(&snap.ats);
            let unquiet = snap.unquiet(self.plan.agenttokens);
            let mut tally = issuer.account(&snap).await;
            if unquiet.is_empty() {
                tally.problems.extend(snap.disagreements());
            }
            let good = unquiet.is_empty() && tally.leaked.is_empty() && tally.problems.is_empty();
            // The last operator has had time to look at everything, and
            // two reads in a row agree.
            if good && since.elapsed() >= MIN_LAST_RUN && good_before {
                println!(
                    "  quiet and accounted for {:.1}s after the last start",
                    since.elapsed().as_secs_f64()
                );
                return tally;
            }
            good_before = good;
            if since.elapsed() >= next_note {
                next_note += Duration::from_secs(10);
                println!(
                    "  settling, {:.0}s: {} not quiet {:?}, {} leaked, {} problems {:?}",
                    since.elapsed().as_secs_f64(),
                    unquiet.len(),
                    unquiet.first(),
                    tally.leaked.len(),
                    tally.problems.len(),
                    tally.problems.first()
                );
            }
            if Instant::now() >= deadline {
                self.report(issuer.kind(), &tally);
                panic!(
                    "chaos {} (seed {}): not settled {}s after the last start.\n\
                     not quiet ({}): {:#?}\nleaked ({}): {:#?}\nproblems ({}): {:#?}\n\
                     operator logs: target/e2e-logs/{}-chaos-*.log",
                    issuer.kind(),
                    self.plan.seed,
                    self.plan.settle.as_secs(),
                    unquiet.len(),
                    unquiet.iter().take(20).collect::<Vec<_>>(),
                    tally.leaked.len(),
                    tally.leaked.iter().take(20).collect::<Vec<_>>(),
                    tally.problems.len(),
                    tally.problems.iter().take(20).collect::<Vec<_>>(),
                    self.ns.name,
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn report(&self, kind: &str, t: &Tally) {
        println!(
            "chaos {kind}: seed {} | {} AgentTokens | kills {} | rotations asked {} | issued {} | \
             in Secrets {} | revoked {} | unknown {} | expired {}{} | leaked {} | wall {:.1}s",
            self.plan.seed,
            self.plan.agenttokens,
            self.kills,
            self.rotations,
            t.issued,
            t.in_secrets,
            t.revoked,
            t.unknown,
            t.expired,
            if t.unrevocable > 0 {
                format!(" | not revocable (valid to expiry) {}", t.unrevocable)
            } else {
                String::new()
            },
            t.leaked.len(),
            self.secs()
        );
    }

    /// The whole run for one issuer kind: operator, AgentTokens, churn with
    /// kills, settle, the ledger's claims against the issuer, and finally
    /// every AgentToken deleted with the operator running.
    async fn drive<I: Issuer>(&mut self, issuer: &mut I, spec: impl Fn(usize) -> Value) {
        self.start_operator();
        self.observe();
        self.create(spec);
        self.churn().await;
        let tally = self.settle(issuer).await;
        if let Some(o) = self.observer.take() {
            o.abort();
        }
        self.report(issuer.kind(), &tally);
        // Every token the issuer revoked, the ledger called Revoked (over
        // all reads). Status is written just after the issuer answers, and
        // a trigger left from the churn may still rotate: a gap is asked
        // about again before it counts.
        let mut unrecorded = Vec::new();
        for _ in 0..5 {
            let snap = Snapshot::read_soon(&self.ns).await;
            self.observed.lock().unwrap().see(&snap.ats);
            let revoked = self.observed.lock().unwrap().revoked.clone();
            unrecorded = issuer.revoked_unrecorded(&revoked).await;
            if unrecorded.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let observed = std::mem::take(&mut *self.observed.lock().unwrap());
        println!(
            "  ledger read {} times; {} revisions seen with a fingerprint, {} seen Revoked",
            observed.reads,
            observed.fingerprints.len(),
            observed.revoked.len()
        );
        assert!(
            tally.issued >= self.plan.agenttokens,
            "the issuer issued {} tokens for {} AgentTokens",
            tally.issued,
            self.plan.agenttokens
        );
        let (notes, mut failures) = issuer.watched(&observed);
        for n in notes {
            println!("  {n}");
        }
        let two = observed.two_fingerprints();
        if !two.is_empty() {
            failures.push(format!(
                "revisions with two fingerprints in the ledger: {two:#?}"
            ));
        }
        let twice = issuer.minted_twice().await;
        if !twice.is_empty() {
            failures.push(format!("revisions minted twice at the issuer: {twice:#?}"));
        }
        if !unrecorded.is_empty() {
            failures.push(format!(
                "revoked at the issuer, never Revoked in the ledger: {unrecorded:#?}"
            ));
        }
        let lies = issuer.revoked_but_active(&observed.revoked).await;
        if !lies.is_empty() {
            failures.push(format!(
                "the ledger says Revoked, the issuer says active: {lies:#?}"
            ));
        }
        // A token leaves the Secret before it is revoked: one the issuer
        // refuses that is still in the Secret once asked was refused while
        // delivered (a previous token whose grace ended meanwhile is not).
        let before = Snapshot::read_soon(&self.ns).await;
        let refused = issuer.not_honoured(&before).await;
        let after = Snapshot::read_soon(&self.ns).await;
        let held = after.fingerprints();
        let undelivered: Vec<String> = refused
            .into_iter()
            .filter(|(at, fp, _)| held.get(at).is_some_and(|f| f.contains(fp)))
            .map(|(_, _, why)| why)
            .collect();
        if !undelivered.is_empty() {
            failures.push(format!(
                "tokens in Secrets the issuer does not honour: {undelivered:#?}"
            ));
        }

        // Every AgentToken deleted while the operator runs: its finalizer
        // revokes what it holds; only Unknown tokens may stay active.
        let out = self.ns.kubectl(&[
            "delete",
            "agenttokens.agenttoken.dev",
            "--all",
            "--wait=false",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let api: Api<AgentToken> = self.ns.api();
        let deadline = Instant::now() + self.plan.settle;
        loop {
            let left = api
                .list(&ListParams::default())
                .await
                .map_or(usize::MAX, |l| l.items.len());
            if left == 0 {
                break;
            }
            if Instant::now() >= deadline {
                failures.push(format!(
                    "{left} AgentTokens still there {}s after their deletion",
                    self.plan.settle.as_secs()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let after = issuer.active_after_deletion(&tally.unknown_keys).await;
        if !after.is_empty() {
            failures.push(format!(
                "active at the issuer after every AgentToken was deleted (not Unknown): {after:#?}"
            ));
        }
        println!("  done at {:.1}s", self.secs());
        assert!(
            failures.is_empty(),
            "chaos {} (seed {}):\n{}\noperator logs: target/e2e-logs/{}-chaos-*.log",
            issuer.kind(),
            self.plan.seed,
            failures.join("\n"),
            self.ns.name
        );
    }
}

// ---------------------------------------------------------------------------
// webhook stand-in

struct WebhookStandIn {
    stand_in: StandIn,
    ns: String,
}

impl WebhookStandIn {
    fn ours(&self) -> Vec<crate::webhook::Issued> {
        self.stand_in
            .issued()
            .into_iter()
            .filter(|t| t.namespace.as_deref() == Some(self.ns.as_str()))
            .collect()
    }
}

impl Issuer for WebhookStandIn {
    fn kind(&self) -> &'static str {
        "webhook stand-in"
    }

    async fn account(&mut self, snap: &Snapshot) -> Tally {
        let now = Timestamp::now();
        let held = snap.fingerprints();
        let mut t = Tally::default();
        for tok in self.ours() {
            t.issued += 1;
            let name = tok.name.clone().unwrap_or_default();
            let rev = tok.revision.unwrap_or(0);
            if held
                .get(&name)
                .is_some_and(|f| f.contains(&tok.fingerprint))
            {
                t.in_secrets += 1;
                if tok.revoked {
                    t.problems.push(format!(
                        "{name} r{rev} ({}): revoked at the stand-in, still in its Secret",
                        tok.fingerprint
                    ));
                }
            } else if tok.revoked {
                t.revoked += 1;
            } else if !tok.active(now) {
                t.expired += 1;
            } else {
                match snap.entry(&name, rev) {
                    Some(e) if covers_unknown(e) => {
                        t.unknown += 1;
                        t.unknown_keys.insert((name.clone(), rev));
                        if e.expires_at.as_ref().is_none_or(|x| x.0 < tok.expires_at) {
                            t.problems.push(format!(
                                "{name} r{rev}: Unknown until {:?}, the stand-in's token lives until {}",
                                e.expires_at.as_ref().map(|x| x.0.to_string()),
                                tok.expires_at
                            ));
                        }
                    }
                    e => t.leaked.push(format!(
                        "{}/{name} r{rev} ({}, stand-in id {}): active at the stand-in, in no Secret; ledger: {}",
                        self.ns,
                        tok.fingerprint,
                        tok.id,
                        describe(e)
                    )),
                }
            }
        }
        t
    }

    async fn revoked_but_active(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        let now = Timestamp::now();
        let by_id: HashMap<String, crate::webhook::Issued> =
            self.ours().into_iter().map(|t| (t.id.clone(), t)).collect();
        let mut out = Vec::new();
        for ((name, rev), e) in revoked {
            let id = e
                .handle
                .as_deref()
                .and_then(|h| h.strip_prefix("webhook-id:"));
            match id.and_then(|id| by_id.get(id)) {
                Some(tok) if tok.active(now) => out.push(format!(
                    "{name} r{rev} ({}): the stand-in's {} is active",
                    e.fingerprint, tok.id
                )),
                Some(tok) if tok.fingerprint != e.fingerprint => out.push(format!(
                    "{name} r{rev}: the ledger's fingerprint {} is not that of the token its handle names ({} {})",
                    e.fingerprint, tok.id, tok.fingerprint
                )),
                Some(_) => {}
                None => out.push(format!(
                    "{name} r{rev}: Revoked with handle {:?}, which names no token of the stand-in",
                    e.handle
                )),
            }
        }
        out
    }

    async fn revoked_unrecorded(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        self.ours()
            .into_iter()
            .filter(|t| t.revoked)
            .filter_map(|t| {
                let key = (t.name.clone().unwrap_or_default(), t.revision.unwrap_or(0));
                let said = revoked.get(&key);
                (said.map(|e| &e.fingerprint) != Some(&t.fingerprint)).then(|| {
                    format!(
                        "{} r{} ({}, stand-in id {}): the ledger's Revoked entry: {}",
                        key.0,
                        key.1,
                        t.fingerprint,
                        t.id,
                        describe(said)
                    )
                })
            })
            .collect()
    }

    async fn minted_twice(&mut self) -> Vec<String> {
        let mut by_rev: BTreeMap<(String, i64), Vec<String>> = BTreeMap::new();
        for t in self.ours() {
            by_rev
                .entry((t.name.unwrap_or_default(), t.revision.unwrap_or(0)))
                .or_default()
                .push(t.id);
        }
        by_rev
            .into_iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|((name, rev), ids)| format!("{name} r{rev}: {ids:?}"))
            .collect()
    }

    async fn not_honoured(&mut self, snap: &Snapshot) -> Vec<(String, String, String)> {
        let now = Timestamp::now();
        let active: BTreeSet<String> = self
            .ours()
            .into_iter()
            .filter(|t| t.active(now))
            .map(|t| t.fingerprint)
            .collect();
        let mut out = Vec::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                let fp = fingerprint(v.as_bytes());
                if !active.contains(&fp) {
                    let why = format!("{name} {slot:?} {fp}: not active at the stand-in");
                    out.push((name.clone(), fp, why));
                }
            }
        }
        out
    }

    async fn active_after_deletion(&mut self, unknown: &BTreeSet<(String, i64)>) -> Vec<String> {
        let now = Timestamp::now();
        self.ours()
            .into_iter()
            .filter(|t| t.active(now))
            .filter(|t| {
                !unknown.contains(&(t.name.clone().unwrap_or_default(), t.revision.unwrap_or(0)))
            })
            .map(|t| {
                format!(
                    "{:?} r{:?} ({}, id {})",
                    t.name, t.revision, t.fingerprint, t.id
                )
            })
            .collect()
    }
}

/// A webhook TokenIssuer `minter` for the stand-in: ids (revoked by id),
/// the default body (namespace, name, revision), maxLifetime 10m.
async fn webhook_issuer(ns: &TestNamespace, stand_in: &StandIn) {
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "minter-auth"},
        "stringData": {"authorization": stand_in.authorization()},
    }))
    .unwrap();
    ns.api::<Secret>()
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
    let issuer = json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": "minter"},
        "spec": {
            "webhook": {
                "url": stand_in.url("/mint"),
                "authorizationSecretRef": {"name": "minter-auth", "key": "authorization"},
                "result": {"tokenPath": "$.data.token", "expiresInPath": "$.data.ttl", "idPath": "$.data.id"},
                "revokeURL": stand_in.url("/revoke"),
            },
            "policy": {"allowedScopes": ["read"], "maxLifetime": "10m"},
        },
    });
    applied(ns, &issuer.to_string());
}

/// The webhook stand-in grants 5 minutes and answers each mint up to 1 s
/// after minting it (a slow service), so kills often fall between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_webhook_stand_in_sigkill_during_mints_and_rotations_leaks_nothing() {
    let stand_in = StandIn::start().await;
    stand_in.set_ttl(300);
    stand_in.set_answer_delay(Duration::from_secs(1));
    let mut run = Run::new("webhook stand-in", "chaos-webhook").await;
    webhook_issuer(&run.ns, &stand_in).await;
    let mut issuer = WebhookStandIn {
        stand_in,
        ns: run.ns.name.clone(),
    };
    run.drive(
        &mut issuer,
        |_| json!({"issuerRef": {"name": "minter"}, "scopes": ["read"], "lifetime": "5m"}),
    )
    .await;
}

// ---------------------------------------------------------------------------
// serviceAccount (real TokenRequest)

/// A binding Secret: name, AgentToken, revision.
type Binding = (String, String, i64);

struct ServiceAccountTokens {
    client: Client,
    ns: String,
    /// Every binding Secret ever seen, by UID.
    seen: Arc<Mutex<BTreeMap<String, Binding>>>,
    watch: tokio::task::JoinHandle<()>,
    /// Reads the Secrets twice a second (see [`ServiceAccountTokens::sample`]).
    sampler: tokio::task::JoinHandle<()>,
    sampled: Arc<Mutex<Sampled>>,
}

/// What the Secrets were seen to hold.
#[derive(Default)]
struct Sampled {
    /// (AgentToken, revision of the binding its token is bound to) ->
    /// fingerprints seen in its Secret.
    delivered: BTreeMap<(String, i64), BTreeSet<String>>,
    /// "Secret key fingerprint" of each token seen in its Secret while its
    /// binding was already deleted (a revoked token handed to consumers).
    dead: BTreeSet<String>,
}

impl Drop for ServiceAccountTokens {
    fn drop(&mut self) {
        self.watch.abort();
        self.sampler.abort();
    }
}

fn binding_of(s: &Secret) -> Option<(String, Binding)> {
    let l = s.metadata.labels.as_ref()?;
    Some((
        s.metadata.uid.clone()?,
        (
            s.name_any(),
            l.get(labels::NAME)?.clone(),
            l.get(labels::REVISION)?.parse().ok()?,
        ),
    ))
}

const BINDINGS: &str = "agenttoken.dev/role=token-binding";

impl ServiceAccountTokens {
    /// Starts watching binding Secrets in `ns` (before any exists).
    async fn watch(ns: &TestNamespace) -> Self {
        let api: Api<Secret> = ns.api();
        let seen: Arc<Mutex<BTreeMap<String, Binding>>> = Arc::default();
        let into = seen.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let watch = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut events = watcher(api, watcher::Config::default().labels(BINDINGS))
                .default_backoff()
                .boxed();
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        if let Some((uid, b)) = binding_of(&s) {
                            into.lock().unwrap().insert(uid, b);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        ready_rx.await.expect("the binding watch started");
        let sampled: Arc<Mutex<Sampled>> = Arc::default();
        let sampler = tokio::spawn(Self::sample(ns.api(), sampled.clone()));
        ServiceAccountTokens {
            client: ns.client.clone(),
            ns: ns.name.clone(),
            seen,
            watch,
            sampler,
            sampled,
        }
    }

    /// Reads every Secret twice a second, in one list (one
    /// resourceVersion): which token each AgentToken's Secret holds, by the
    /// binding it is bound to, and whether that binding still exists. The
    /// operator writes the Secret before it deletes a binding, so no read
    /// shows a Secret's token bound to a binding that is gone.
    async fn sample(api: Api<Secret>, into: Arc<Mutex<Sampled>>) {
        use agent_token_operator::issuer::service_account::BINDING_SECRET_TYPE;
        loop {
            if let Ok(list) = api.list(&ListParams::default()).await {
                let bindings: HashMap<String, i64> = list
                    .items
                    .iter()
                    .filter(|s| s.type_.as_deref() == Some(BINDING_SECRET_TYPE))
                    .filter_map(binding_of)
                    .map(|(uid, (_, _, rev))| (uid, rev))
                    .collect();
                let mut into = into.lock().unwrap();
                for s in &list.items {
                    for (k, v) in s.data.iter().flatten() {
                        if k != "token" && k != "token.previous" {
                            continue;
                        }
                        let Ok(v) = std::str::from_utf8(&v.0) else {
                            continue;
                        };
                        let Some(uid) = bound_to(v) else { continue };
                        let fp = fingerprint(v.as_bytes());
                        match bindings.get(&uid) {
                            Some(rev) => {
                                into.delivered
                                    .entry((s.name_any(), *rev))
                                    .or_default()
                                    .insert(fp);
                            }
                            None => {
                                into.dead.insert(format!("{} {k} {fp}", s.name_any()));
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn list(&self) -> Option<BTreeMap<String, Binding>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let list = api
            .list(&ListParams::default().labels(BINDINGS))
            .await
            .ok()?;
        Some(list.items.iter().filter_map(binding_of).collect())
    }
}

/// A JWT's claims, read, not verified.
fn claims_of(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The UID of the binding Secret a ServiceAccount token is bound to, from
/// its claims (read, not verified: TokenReview verifies).
fn bound_to(token: &str) -> Option<String> {
    claims_of(token)?["kubernetes.io"]["secret"]["uid"]
        .as_str()
        .map(String::from)
}

impl Issuer for ServiceAccountTokens {
    fn kind(&self) -> &'static str {
        "serviceAccount"
    }

    async fn account(&mut self, snap: &Snapshot) -> Tally {
        let mut t = Tally::default();
        // Seen first, present second: a binding created in between is not
        // taken for deleted.
        let mut seen = self.seen.lock().unwrap().clone();
        let Some(present) = self.list().await else {
            t.problems.push("could not list binding Secrets".into());
            return t;
        };
        seen.extend(present.clone());
        // Binding UID -> the Secret (and key) holding a token bound to it.
        let mut delivered: HashMap<String, String> = HashMap::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                match bound_to(&v) {
                    Some(uid) => {
                        if !present.contains_key(&uid) {
                            t.problems.push(format!(
                                "{name} {slot:?} ({}): its binding Secret is gone, the token is revoked",
                                fingerprint(v.as_bytes())
                            ));
                        }
                        delivered.insert(uid, format!("{name} {slot:?}"));
                    }
                    None => t
                        .problems
                        .push(format!("{name} {slot:?}: not a token bound to a Secret")),
                }
            }
        }
        for (uid, (binding, name, rev)) in &seen {
            t.issued += 1;
            if !present.contains_key(uid) {
                t.revoked += 1;
            } else if delivered.contains_key(uid) {
                t.in_secrets += 1;
            } else {
                match snap.entry(name, *rev) {
                    Some(e) if covers_unknown(e) => {
                        t.unknown += 1;
                        t.unknown_keys.insert((name.clone(), *rev));
                    }
                    e => t.leaked.push(format!(
                        "{}/{name} r{rev}: binding {binding} (uid {uid}) still exists, so its token is valid, and no Secret holds a token bound to it; ledger: {}",
                        self.ns,
                        describe(e)
                    )),
                }
            }
        }
        t
    }

    async fn revoked_but_active(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        let present = self.list().await.unwrap_or_default();
        let names: BTreeMap<&str, &str> = present
            .iter()
            .map(|(uid, (n, _, _))| (n.as_str(), uid.as_str()))
            .collect();
        revoked
            .iter()
            .filter_map(|((name, rev), e)| {
                let binding = e.handle.clone().unwrap_or_else(|| {
                    agent_token_operator::issuer::service_account::binding_name(name, *rev)
                });
                names.get(binding.as_str()).map(|uid| {
                    format!(
                        "{name} r{rev} ({}): binding {binding} (uid {uid}) still exists",
                        e.fingerprint
                    )
                })
            })
            .collect()
    }

    async fn revoked_unrecorded(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        let seen = self.seen.lock().unwrap().clone();
        let present = self.list().await.unwrap_or_default();
        // A binding created twice under one name (a mint that failed and
        // was tried again) has only one revision to be recorded under.
        let mut uids_per_name: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, _, _) in seen.values() {
            *uids_per_name.entry(name.as_str()).or_default() += 1;
        }
        seen.iter()
            .filter(|(uid, _)| !present.contains_key(*uid))
            .filter(|(_, (binding, _, _))| uids_per_name.get(binding.as_str()) == Some(&1))
            .filter(|(_, (_, name, rev))| !revoked.contains_key(&(name.clone(), *rev)))
            .map(|(uid, (binding, name, rev))| {
                format!("{name} r{rev}: binding {binding} (uid {uid}) was deleted")
            })
            .collect()
    }

    async fn minted_twice(&mut self) -> Vec<String> {
        // A binding name seen under two UIDs was created twice for one
        // revision; each binding holds at most one token, and a binding
        // without a token (its TokenRequest never ran) looks the same, so
        // this is reported, not failed.
        let seen = self.seen.lock().unwrap().clone();
        let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
        for (name, _, _) in seen.values() {
            *by_name.entry(name.clone()).or_default() += 1;
        }
        let twice: Vec<_> = by_name.iter().filter(|(_, n)| **n > 1).collect();
        if !twice.is_empty() {
            println!("  binding Secrets created more than once: {twice:?}");
        }
        Vec::new()
    }

    async fn not_honoured(&mut self, snap: &Snapshot) -> Vec<(String, String, String)> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let mut out = Vec::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                let tr = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(v.clone()),
                        audiences: None,
                    },
                    ..Default::default()
                };
                let ok = api
                    .create(&PostParams::default(), &tr)
                    .await
                    .ok()
                    .and_then(|r| r.status)
                    .and_then(|s| s.authenticated)
                    == Some(true);
                if !ok {
                    let fp = fingerprint(v.as_bytes());
                    let why =
                        format!("{name} {slot:?} ({fp}): TokenReview does not authenticate it");
                    out.push((name.clone(), fp, why));
                }
            }
        }
        out
    }

    fn watched(&mut self, observed: &Observed) -> (Vec<String>, Vec<String>) {
        self.sampler.abort();
        let sampled = self.sampled.lock().unwrap();
        let mut failures = Vec::new();
        if !sampled.dead.is_empty() {
            failures.push(format!(
                "Secrets seen holding a token whose binding was deleted (a revoked token handed to consumers): {:#?}",
                sampled.dead
            ));
        }
        // The ledger says which token a delivered revision was: a token
        // seen in a Secret whose fingerprint the ledger never showed for
        // its revision is one the ledger cannot name (a delivered token
        // revoked as an interrupted mint after a crash did this).
        let unnamed: Vec<String> = sampled
            .delivered
            .iter()
            .flat_map(|((name, rev), fps)| {
                let known = observed.fingerprints.get(&(name.clone(), *rev));
                fps.iter()
                    .filter(move |fp| known.is_none_or(|k| !k.contains(*fp)))
                    .map(move |fp| format!("{name} r{rev} {fp}"))
            })
            .collect();
        if !unnamed.is_empty() {
            failures.push(format!(
                "tokens seen in a Secret whose fingerprint the ledger never showed for their revision: {unnamed:#?}"
            ));
        }
        let notes = vec![format!(
            "{} revisions seen delivered in Secrets; tokens seen in a Secret whose fingerprint the ledger never showed for their revision: {}{}",
            sampled.delivered.len(),
            unnamed.len(),
            if unnamed.is_empty() {
                String::new()
            } else {
                format!(" {:?}", unnamed.iter().take(10).collect::<Vec<_>>())
            }
        )];
        (notes, failures)
    }

    async fn active_after_deletion(&mut self, _unknown: &BTreeSet<(String, i64)>) -> Vec<String> {
        // Bindings are owned by their AgentToken: garbage collection takes
        // what the finalizer left, so nothing is asked of them here.
        Vec::new()
    }
}

/// Real TokenRequests for one ServiceAccount; a token lives while its
/// binding Secret does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_service_account_sigkill_during_token_requests_leaks_nothing() {
    let mut run = Run::new("serviceAccount", "chaos-sa").await;
    applied(&run.ns, SA_ISSUER);
    let mut issuer = ServiceAccountTokens::watch(&run.ns).await;
    run.drive(&mut issuer, |_| {
        json!({"issuerRef": {"name": "sa"}, "serviceAccountName": "builder", "lifetime": "10m"})
    })
    .await;
}

// ---------------------------------------------------------------------------
// real OpenBao

/// A child token as the audit log recorded its creation.
#[derive(Clone, Debug)]
struct Created {
    accessor: String,
    name: String,
    revision: i64,
    expires_at: Timestamp,
}

struct OpenBaoTokens {
    bao: OpenBao,
    audit: PathBuf,
    ns: String,
    /// Token fingerprint -> accessor, for tokens found in Secrets.
    accessors: HashMap<String, String>,
    /// The run's reads of the ledger.
    observed: Arc<Mutex<Observed>>,
}

impl OpenBaoTokens {
    /// Child tokens created for this namespace's AgentTokens, from the
    /// audit log (accessors in clear; token values are HMAC'd there).
    fn created(&self) -> Vec<Created> {
        let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
        let prefix = format!("{}/", self.ns);
        text.lines()
            .filter(|l| l.contains("auth/token/create"))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["type"] == "response" && v["request"]["path"] == "auth/token/create")
            .filter_map(|v| {
                let auth = &v["response"]["auth"];
                let name = auth["metadata"]["agenttoken"]
                    .as_str()?
                    .strip_prefix(&prefix)?
                    .to_string();
                let at: Timestamp = v["time"].as_str()?.parse().ok()?;
                let ttl = auth["token_ttl"].as_i64()?;
                Some(Created {
                    accessor: auth["accessor"].as_str()?.to_string(),
                    name,
                    revision: auth["metadata"]["revision"].as_str()?.parse().ok()?,
                    expires_at: at + jiff::SignedDuration::from_secs(ttl),
                })
            })
            .collect()
    }

    /// Accessors of every token alive in the token store.
    async fn alive(&self) -> Option<BTreeSet<String>> {
        let (s, body) = self.bao.call("LIST", "auth/token/accessors", None).await;
        (s == 200).then(|| {
            body["data"]["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
    }

    /// The accessor of a token value (looked up once per token).
    async fn accessor_of(&mut self, token: &str) -> Option<String> {
        let fp = fingerprint(token.as_bytes());
        if let Some(a) = self.accessors.get(&fp) {
            return Some(a.clone());
        }
        let (s, body) = self
            .bao
            .call("POST", "auth/token/lookup", Some(json!({"token": token})))
            .await;
        let a = (s == 200)
            .then(|| body["data"]["accessor"].as_str().map(String::from))
            .flatten()?;
        self.accessors.insert(fp, a.clone());
        Some(a)
    }
}

impl Issuer for OpenBaoTokens {
    fn kind(&self) -> &'static str {
        "OpenBao"
    }

    async fn account(&mut self, snap: &Snapshot) -> Tally {
        let mut t = Tally::default();
        let now = Timestamp::now();
        // Created first, alive second: a token created in between is not
        // taken for dead.
        let created = self.created();
        let Some(alive) = self.alive().await else {
            t.problems.push("could not list OpenBao's accessors".into());
            return t;
        };
        let mut delivered: BTreeSet<String> = BTreeSet::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                match self.accessor_of(&v).await {
                    Some(a) => {
                        delivered.insert(a);
                    }
                    None => t.problems.push(format!(
                        "{name} {slot:?} ({}): OpenBao does not know this token (dead)",
                        fingerprint(v.as_bytes())
                    )),
                }
            }
        }
        for c in created {
            t.issued += 1;
            if delivered.contains(&c.accessor) {
                t.in_secrets += 1;
            } else if !alive.contains(&c.accessor) {
                if now < c.expires_at {
                    t.revoked += 1;
                } else {
                    t.expired += 1;
                }
            } else {
                match snap.entry(&c.name, c.revision) {
                    Some(e) if covers_unknown(e) => {
                        t.unknown += 1;
                        t.unknown_keys.insert((c.name.clone(), c.revision));
                        if e.expires_at.as_ref().is_none_or(|x| x.0 < c.expires_at) {
                            t.problems.push(format!(
                                "{} r{}: Unknown until {:?}, OpenBao's token lives until {}",
                                c.name,
                                c.revision,
                                e.expires_at.as_ref().map(|x| x.0.to_string()),
                                c.expires_at
                            ));
                        }
                    }
                    e => t.leaked.push(format!(
                        "{}/{} r{} (accessor {}): alive in OpenBao, in no Secret; ledger: {}",
                        self.ns,
                        c.name,
                        c.revision,
                        c.accessor,
                        describe(e)
                    )),
                }
            }
        }
        t
    }

    async fn revoked_but_active(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        let alive = self.alive().await.unwrap_or_default();
        let created: HashMap<String, Created> = self
            .created()
            .into_iter()
            .map(|c| (c.accessor.clone(), c))
            .collect();
        let mut out = Vec::new();
        for ((name, rev), e) in revoked {
            let accessor = e
                .handle
                .as_deref()
                .and_then(|h| h.strip_prefix("vault-accessor:"));
            match accessor {
                Some(a) if alive.contains(a) => out.push(format!(
                    "{name} r{rev} ({}): accessor {a} is alive",
                    e.fingerprint
                )),
                Some(a) => {
                    if let Some(c) = created.get(a)
                        && (c.name != *name || c.revision != *rev)
                    {
                        out.push(format!(
                            "{name} r{rev}: its handle names the token of {} r{}",
                            c.name, c.revision
                        ));
                    }
                }
                None => out.push(format!(
                    "{name} r{rev}: Revoked with handle {:?}, not an accessor",
                    e.handle
                )),
            }
        }
        out
    }

    async fn revoked_unrecorded(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        let now = Timestamp::now();
        // Created first, alive second: a token created in between is not
        // taken for dead.
        let created = self.created();
        let Some(alive) = self.alive().await else {
            return vec!["could not list OpenBao's accessors".into()];
        };
        let gone = self.observed.lock().unwrap().gone.clone();
        created
            .into_iter()
            .filter(|c| !alive.contains(&c.accessor) && now < c.expires_at)
            .filter(|c| !gone.contains(&(c.name.clone(), c.revision)))
            .filter_map(|c| {
                let said = revoked.get(&(c.name.clone(), c.revision));
                let handle = format!("vault-accessor:{}", c.accessor);
                (said.and_then(|e| e.handle.as_ref()) != Some(&handle)).then(|| {
                    format!(
                        "{} r{} (accessor {}): the ledger's Revoked entry: {}",
                        c.name,
                        c.revision,
                        c.accessor,
                        describe(said)
                    )
                })
            })
            .collect()
    }

    async fn minted_twice(&mut self) -> Vec<String> {
        let mut by_rev: BTreeMap<(String, i64), Vec<String>> = BTreeMap::new();
        for c in self.created() {
            by_rev
                .entry((c.name, c.revision))
                .or_default()
                .push(c.accessor);
        }
        by_rev
            .into_iter()
            .filter(|(_, a)| a.len() > 1)
            .map(|((name, rev), a)| format!("{name} r{rev}: accessors {a:?}"))
            .collect()
    }

    async fn not_honoured(&mut self, snap: &Snapshot) -> Vec<(String, String, String)> {
        let alive = self.alive().await.unwrap_or_default();
        let mut out = Vec::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                match self.accessor_of(&v).await {
                    Some(a) if alive.contains(&a) => {}
                    _ => {
                        let fp = fingerprint(v.as_bytes());
                        let why = format!("{name} {slot:?} ({fp}): not alive in OpenBao");
                        out.push((name.clone(), fp, why));
                    }
                }
            }
        }
        out
    }

    async fn active_after_deletion(&mut self, unknown: &BTreeSet<(String, i64)>) -> Vec<String> {
        let alive = self.alive().await.unwrap_or_default();
        self.created()
            .into_iter()
            .filter(|c| alive.contains(&c.accessor))
            .filter(|c| !unknown.contains(&(c.name.clone(), c.revision)))
            .map(|c| format!("{} r{} (accessor {})", c.name, c.revision, c.accessor))
            .collect()
    }
}

/// Real child tokens of a real OpenBao (dev server, from PyPI), created
/// with the operator's root token; 5-minute lifetimes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_openbao_sigkill_during_child_token_mints_leaks_nothing() {
    let logs = repo_root().join("target/e2e-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let audit_dir = logs.join(format!("openbao-audit-{}", crate::support::random_suffix()));
    std::fs::create_dir_all(&audit_dir).unwrap();
    let audit = audit_dir.join("audit.log");
    // Accessors in clear (they are handles, not credentials); token values
    // stay HMAC'd in the log.
    let config = format!(
        "audit \"file\" \"chaos\" {{\n  options {{\n    file_path = \"{}\"\n    hmac_accessor = \"false\"\n  }}\n}}\n",
        audit.display()
    );
    let bao = OpenBao::start_with_config(&config).await;
    let mut run = Run::new("OpenBao", "chaos-bao").await;
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bao-token"},
        "stringData": {"token": bao.root},
    }))
    .unwrap();
    run.ns
        .api::<Secret>()
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
    let issuer = json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": "bao"},
        "spec": {
            "vault": {
                "address": bao.addr,
                "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}},
            },
            "policy": {"allowedScopes": ["default"], "maxLifetime": "10m"},
        },
    });
    applied(&run.ns, &issuer.to_string());
    let mut issuer = OpenBaoTokens {
        bao,
        audit,
        ns: run.ns.name.clone(),
        accessors: HashMap::new(),
        observed: run.observed.clone(),
    };
    run.drive(
        &mut issuer,
        |_| json!({"issuerRef": {"name": "bao"}, "scopes": ["default"], "lifetime": "5m"}),
    )
    .await;
}

// ---------------------------------------------------------------------------
// issuers that know a token by its value, not whom it was for (oauth2,
// githubApp)

/// A token as such an issuer recorded it (a fingerprint, never the value).
#[derive(Clone, Debug)]
struct ByValue {
    /// The issuer's own name for it, for messages.
    id: String,
    fingerprint: String,
    expires_at: Timestamp,
    /// Whether the issuer honours it.
    active: bool,
}

/// What [`account_by_value`] found, kept for the checks after settling.
#[derive(Default)]
struct ByValueSeen {
    /// Fingerprints of active tokens an `Unknown` entry covers.
    covered: BTreeSet<String>,
    /// How many of them no entry named (covered by an `Unknown` entry that
    /// has no fingerprint).
    covered_unnamed: usize,
    /// Every token, as last accounted.
    tokens: Vec<ByValue>,
}

/// Tokens against the ledger, by fingerprint. Such an issuer cannot say
/// which AgentToken a token it minted was for, and a token the operator
/// never heard of has no fingerprint in the ledger: each active token in no
/// Secret that no entry names must be covered by an `Unknown` entry without
/// a fingerprint (an interrupted mint), one entry per token, valid at least
/// as long (matched by expiry: each token, soonest expiry first, takes the
/// soonest-expiring entry that still covers it).
fn account_by_value(ns: &str, tokens: &[ByValue], snap: &Snapshot) -> (Tally, ByValueSeen) {
    let mut t = Tally::default();
    let mut seen = ByValueSeen {
        tokens: tokens.to_vec(),
        ..Default::default()
    };
    let now = Timestamp::now();
    let held: HashMap<String, String> = snap
        .fingerprints()
        .into_iter()
        .flat_map(|(name, fps)| fps.into_iter().map(move |fp| (fp, name.clone())))
        .collect();
    let named: HashMap<&str, (String, &HistoryEntry)> = snap
        .entries()
        .filter(|(_, e)| e.fingerprint.starts_with("sha256:"))
        .map(|(name, e)| (e.fingerprint.as_str(), (name, e)))
        .collect();
    let mut unnamed: Vec<(String, &HistoryEntry)> = snap
        .entries()
        .filter(|(_, e)| covers_unknown(e) && !e.fingerprint.starts_with("sha256:"))
        .collect();
    unnamed.sort_by_key(|(_, e)| e.expires_at.as_ref().map(|x| x.0));
    let mut used = vec![false; unnamed.len()];
    let mut by_expiry: Vec<&ByValue> = tokens.iter().collect();
    by_expiry.sort_by_key(|tok| tok.expires_at);
    for tok in by_expiry {
        t.issued += 1;
        if let Some(name) = held.get(&tok.fingerprint) {
            t.in_secrets += 1;
            if !tok.active {
                t.problems.push(format!(
                    "{name} ({}, {}): in its Secret, not honoured by the issuer",
                    tok.fingerprint, tok.id
                ));
            }
        } else if !tok.active {
            if now < tok.expires_at {
                t.revoked += 1;
            } else {
                t.expired += 1;
            }
        } else if let Some((name, e)) = named.get(tok.fingerprint.as_str()) {
            if covers_unknown(e) {
                t.unknown += 1;
                t.unknown_keys.insert((name.clone(), e.revision));
                seen.covered.insert(tok.fingerprint.clone());
                if e.expires_at.as_ref().is_none_or(|x| x.0 < tok.expires_at) {
                    t.problems.push(format!(
                        "{name} r{}: Unknown until {:?}, the issuer's token lives until {}",
                        e.revision,
                        e.expires_at.as_ref().map(|x| x.0.to_string()),
                        tok.expires_at
                    ));
                }
            } else {
                t.leaked.push(format!(
                    "{ns}/{name} ({}, {}): active at the issuer, in no Secret; ledger: {}",
                    tok.fingerprint,
                    tok.id,
                    describe(Some(e))
                ));
            }
        } else {
            let cover = unnamed.iter().enumerate().position(|(i, (_, e))| {
                !used[i] && e.expires_at.as_ref().is_some_and(|x| x.0 >= tok.expires_at)
            });
            match cover {
                Some(i) => {
                    used[i] = true;
                    let (name, e) = &unnamed[i];
                    t.unknown += 1;
                    t.unknown_keys.insert((name.clone(), e.revision));
                    seen.covered.insert(tok.fingerprint.clone());
                    seen.covered_unnamed += 1;
                }
                None => t.leaked.push(format!(
                    "{ns} ({}, {}, valid until {}): active at the issuer, in no Secret, no ledger entry names it and no Unknown entry is left to cover it ({} Unknown entries without a fingerprint)",
                    tok.fingerprint,
                    tok.id,
                    tok.expires_at,
                    unnamed.len()
                )),
            }
        }
    }
    (t, seen)
}

/// `Revoked` entries whose token the issuer still honours, or that name no
/// token it issued.
fn revoked_but_active_by_value(
    tokens: &[ByValue],
    revoked: &BTreeMap<(String, i64), HistoryEntry>,
) -> Vec<String> {
    let by_fp: HashMap<&str, &ByValue> =
        tokens.iter().map(|t| (t.fingerprint.as_str(), t)).collect();
    revoked
        .iter()
        .filter_map(|((name, rev), e)| match by_fp.get(e.fingerprint.as_str()) {
            Some(t) if t.active => Some(format!(
                "{name} r{rev} ({}): the issuer's {} is active",
                e.fingerprint, t.id
            )),
            Some(_) => None,
            None => Some(format!(
                "{name} r{rev}: Revoked, its fingerprint {} names no token the issuer issued",
                e.fingerprint
            )),
        })
        .collect()
}

/// Tokens the issuer revoked (dead before their expiry) whose fingerprint
/// the ledger was never seen to call `Revoked`.
fn revoked_unrecorded_by_value(
    tokens: &[ByValue],
    revoked: &BTreeMap<(String, i64), HistoryEntry>,
) -> Vec<String> {
    let now = Timestamp::now();
    let said: BTreeSet<&str> = revoked.values().map(|e| e.fingerprint.as_str()).collect();
    tokens
        .iter()
        .filter(|t| !t.active && now < t.expires_at && !said.contains(t.fingerprint.as_str()))
        .map(|t| {
            format!(
                "{} ({}): dead at the issuer before its expiry {}, never Revoked in the ledger",
                t.fingerprint, t.id, t.expires_at
            )
        })
        .collect()
}

/// How the issuer's tokens were known to the ledger, over all its reads.
fn watched_by_value(seen: &ByValueSeen, observed: &Observed) -> Vec<String> {
    let named: BTreeSet<&String> = observed.fingerprints.values().flatten().collect();
    let by_fp = seen
        .tokens
        .iter()
        .filter(|t| named.contains(&t.fingerprint))
        .count();
    vec![format!(
        "{} tokens at the issuer: {by_fp} named by fingerprint in the ledger, {} active ones covered by an Unknown entry without a fingerprint, {} neither (never delivered, died)",
        seen.tokens.len(),
        seen.covered_unnamed,
        seen.tokens.len() - by_fp - seen.covered_unnamed
    )]
}

fn active_after_deletion_by_value(tokens: &[ByValue], covered: &BTreeSet<String>) -> Vec<String> {
    tokens
        .iter()
        .filter(|t| t.active && !covered.contains(&t.fingerprint))
        .map(|t| format!("{} ({})", t.fingerprint, t.id))
        .collect()
}

// ---------------------------------------------------------------------------
// oauth2 against the real oidc-provider

struct OAuth2Tokens {
    provider: crate::oauth2::Provider,
    ns: String,
    /// Fingerprints of tokens introspection called inactive (for good).
    dead: BTreeSet<String>,
    seen: ByValueSeen,
}

impl OAuth2Tokens {
    /// Every access token the provider issued, from its own record; tokens
    /// in `held` (in a Secret) are taken as active without asking, the
    /// others are asked by introspection (RFC 7662) until inactive.
    async fn tokens(&mut self, held: &BTreeSet<String>) -> Option<Vec<ByValue>> {
        let issued = self.provider.issued().await?;
        let mut out = Vec::with_capacity(issued.len());
        for (i, (value, exp)) in issued.into_iter().enumerate() {
            let fp = fingerprint(value.as_bytes());
            let active = if held.contains(&fp) {
                true
            } else if self.dead.contains(&fp) {
                false
            } else {
                let a = crate::oauth2::introspect(&self.provider, &value).await["active"] == true;
                if !a {
                    self.dead.insert(fp.clone());
                }
                a
            };
            out.push(ByValue {
                id: format!("access token {}", i + 1),
                fingerprint: fp,
                expires_at: Timestamp::from_second(exp).ok()?,
                active,
            });
        }
        Some(out)
    }
}

impl Issuer for OAuth2Tokens {
    fn kind(&self) -> &'static str {
        "oauth2 (real oidc-provider)"
    }

    async fn account(&mut self, snap: &Snapshot) -> Tally {
        let held = snap.fingerprints().into_values().flatten().collect();
        let Some(tokens) = self.tokens(&held).await else {
            let mut t = Tally::default();
            t.problems
                .push("could not read the provider's record of issued tokens".into());
            return t;
        };
        let (t, seen) = account_by_value(&self.ns, &tokens, snap);
        self.seen = seen;
        t
    }

    async fn revoked_but_active(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        match self.tokens(&BTreeSet::new()).await {
            Some(tokens) => revoked_but_active_by_value(&tokens, revoked),
            None => vec!["could not read the provider's record of issued tokens".into()],
        }
    }

    async fn revoked_unrecorded(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        match self.tokens(&BTreeSet::new()).await {
            Some(tokens) => revoked_unrecorded_by_value(&tokens, revoked),
            None => vec!["could not read the provider's record of issued tokens".into()],
        }
    }

    async fn minted_twice(&mut self) -> Vec<String> {
        // The provider does not know revisions: a revision minted twice
        // shows as two fingerprints for it in the ledger
        // (`Observed::two_fingerprints`), or as a token no entry names and
        // no Unknown entry covers (leaked).
        Vec::new()
    }

    async fn not_honoured(&mut self, snap: &Snapshot) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                if crate::oauth2::introspect(&self.provider, &v).await["active"] != true {
                    let fp = fingerprint(v.as_bytes());
                    let why = format!("{name} {slot:?} ({fp}): introspection says inactive");
                    out.push((name.clone(), fp, why));
                }
            }
        }
        out
    }

    fn watched(&mut self, observed: &Observed) -> (Vec<String>, Vec<String>) {
        (watched_by_value(&self.seen, observed), Vec::new())
    }

    async fn active_after_deletion(&mut self, _unknown: &BTreeSet<(String, i64)>) -> Vec<String> {
        match self.tokens(&BTreeSet::new()).await {
            Some(tokens) => active_after_deletion_by_value(&tokens, &self.seen.covered),
            None => vec!["could not read the provider's record of issued tokens".into()],
        }
    }
}

/// The REAL oidc-provider (npm; `e2e/oidc/server.mjs`): client-credentials
/// access tokens of 5 minutes, revoked by value (RFC 7009) from the keeper
/// in the operator's namespace. The provider stores every token it issues
/// and lists them on a test endpoint; introspection (RFC 7662) says which
/// are active. It answers each token request up to 1 s after storing the
/// token, so kills fall between "issued" and "the operator heard of it".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_oauth2_real_oidc_provider_sigkill_during_client_credentials_leaks_nothing() {
    let provider = crate::oauth2::start_provider_with(300, Duration::from_secs(1));
    let mut run = Run::new("oauth2 (real oidc-provider)", "chaos-oauth2").await;
    crate::oauth2::client_secret(&run.ns, &provider.basic.1).await;
    applied(
        &run.ns,
        &crate::oauth2::issuer_yaml(&provider, "ClientSecretBasic", &provider.basic.0),
    );
    let mut issuer = OAuth2Tokens {
        provider,
        ns: run.ns.name.clone(),
        dead: BTreeSet::new(),
        seen: ByValueSeen::default(),
    };
    run.drive(
        &mut issuer,
        |_| json!({"issuerRef": {"name": "idp"}, "scopes": ["deploy"], "lifetime": "5m"}),
    )
    .await;
}

// ---------------------------------------------------------------------------
// githubApp stand-in

struct GitHubTokens {
    stand_in: crate::github_app::StandIn,
    ns: String,
    seen: ByValueSeen,
}

impl GitHubTokens {
    fn tokens(&self) -> Vec<ByValue> {
        self.stand_in
            .minted()
            .into_iter()
            .map(|m| ByValue {
                id: format!("installation token {}", m.n),
                fingerprint: m.fingerprint,
                expires_at: m.expires_at,
                active: m.active,
            })
            .collect()
    }
}

impl Issuer for GitHubTokens {
    fn kind(&self) -> &'static str {
        "githubApp stand-in"
    }

    async fn account(&mut self, snap: &Snapshot) -> Tally {
        let (t, seen) = account_by_value(&self.ns, &self.tokens(), snap);
        self.seen = seen;
        t
    }

    async fn revoked_but_active(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        revoked_but_active_by_value(&self.tokens(), revoked)
    }

    async fn revoked_unrecorded(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        revoked_unrecorded_by_value(&self.tokens(), revoked)
    }

    async fn minted_twice(&mut self) -> Vec<String> {
        // As for oauth2: GitHub does not know revisions.
        Vec::new()
    }

    async fn not_honoured(&mut self, snap: &Snapshot) -> Vec<(String, String, String)> {
        let active: BTreeSet<String> = self
            .tokens()
            .into_iter()
            .filter(|t| t.active)
            .map(|t| t.fingerprint)
            .collect();
        let mut out = Vec::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                let fp = fingerprint(v.as_bytes());
                if !active.contains(&fp) {
                    let why = format!("{name} {slot:?} ({fp}): not active at the stand-in");
                    out.push((name.clone(), fp, why));
                }
            }
        }
        out
    }

    fn watched(&mut self, observed: &Observed) -> (Vec<String>, Vec<String>) {
        let rejected = self.stand_in.jwt_rejections();
        let failures = if rejected.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "the stand-in refused {} App JWTs: {:?}",
                rejected.len(),
                rejected.iter().take(5).collect::<Vec<_>>()
            )]
        };
        (watched_by_value(&self.seen, observed), failures)
    }

    async fn active_after_deletion(&mut self, _unknown: &BTreeSet<(String, i64)>) -> Vec<String> {
        active_after_deletion_by_value(&self.tokens(), &self.seen.covered)
    }
}

/// The GitHub App STAND-IN (`tests/e2e/github_app.rs`): installation tokens
/// of an hour, revoked with the token itself (`DELETE /installation/token`)
/// from the keeper. The stand-in records every token it minted and whether
/// it is revoked, and answers each mint up to 1 s after minting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_github_app_stand_in_sigkill_during_installation_token_mints_leaks_nothing() {
    let stand_in = crate::github_app::StandIn::start().await;
    stand_in.set_answer_delay(Duration::from_secs(1));
    let mut run = Run::new("githubApp stand-in", "chaos-github").await;
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "app-key"},
        "stringData": {"private-key.pem": stand_in.private_pem},
    }))
    .unwrap();
    run.ns
        .api::<Secret>()
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
    let issuer = json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": "github"},
        "spec": {
            "githubApp": {
                "apiURL": format!("http://127.0.0.1:{}", stand_in.port),
                "appID": crate::github_app::APP_ID,
                "privateKeySecretRef": {"name": "app-key", "key": "private-key.pem"},
            },
            "policy": {
                "allowedRepositories": ["infra"],
                "allowedPermissions": {"contents": "read"},
            },
        },
    });
    applied(&run.ns, &issuer.to_string());
    let mut issuer = GitHubTokens {
        stand_in,
        ns: run.ns.name.clone(),
        seen: ByValueSeen::default(),
    };
    run.drive(&mut issuer, |_| {
        json!({
            "issuerRef": {"name": "github"},
            "permissions": {"contents": "read"},
            "repositories": ["infra"],
            "lifetime": "1h",
        })
    })
    .await;
}

// ---------------------------------------------------------------------------
// jwt (signed by the operator itself)

/// A JWT seen in a Secret.
#[derive(Clone, Debug)]
struct SeenJwt {
    /// The AgentToken whose Secret held it.
    name: String,
    /// Its `exp` claim.
    exp: i64,
}

/// What the Secrets and the ledger were seen to hold.
#[derive(Default)]
struct JwtSampled {
    /// Fingerprint -> the JWT, for every value ever seen in a Secret.
    seen: BTreeMap<String, SeenJwt>,
    /// What the ledger said of a JWT while it was in its Secret, where
    /// that was not honest, and claims that name the wrong AgentToken.
    dishonest: BTreeSet<String>,
    reads: usize,
}

struct JwtDelivered {
    ns: String,
    client: Client,
    /// Reads the Secrets and the ledger twice a second (see
    /// [`JwtDelivered::sample`]).
    sampler: tokio::task::JoinHandle<()>,
    sampled: Arc<Mutex<JwtSampled>>,
    /// The run's ledger reads (fingerprints a pruned entry once had).
    observed: Arc<Mutex<Observed>>,
    /// `Unknown` entries at the last account.
    unknown_entries: usize,
}

impl Drop for JwtDelivered {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

impl JwtDelivered {
    fn watch(ns: &TestNamespace, observed: Arc<Mutex<Observed>>) -> Self {
        let sampled: Arc<Mutex<JwtSampled>> = Arc::default();
        let sampler = tokio::spawn(Self::sample(
            ns.name.clone(),
            ns.api(),
            ns.api(),
            sampled.clone(),
        ));
        JwtDelivered {
            ns: ns.name.clone(),
            client: ns.client.clone(),
            sampler,
            sampled,
            observed,
            unknown_entries: 0,
        }
    }

    /// Reads the Secrets, then the AgentTokens, then the Secrets again,
    /// twice a second. Every JWT in a Secret is recorded, its claims must
    /// name that AgentToken, and the ledger entry with its fingerprint must
    /// carry its `jti` and an `expiresAt` not before its `exp`. The
    /// operator records a token (`Minting` with its fingerprint) before it
    /// writes it to the Secret and takes it out of the Secret before it
    /// closes its entry, so a JWT in the Secret on both reads is `Live` or
    /// `Grace` (or still `Minting`: delivered, its final status not yet
    /// written) in the read between, never `Revoked`, never unnamed.
    async fn sample(
        ns: String,
        secrets: Api<Secret>,
        ats: Api<AgentToken>,
        into: Arc<Mutex<JwtSampled>>,
    ) {
        loop {
            let read = async {
                let before = secrets.list(&ListParams::default()).await.ok()?.items;
                let ledger = ats.list(&ListParams::default()).await.ok()?.items;
                let after = secrets.list(&ListParams::default()).await.ok()?.items;
                Some((
                    Snapshot::of(ledger.clone(), before),
                    Snapshot::of(ledger, after),
                ))
            };
            if let Some((then, later)) = read.await {
                let mut into = into.lock().unwrap();
                into.reads += 1;
                for at in &then.ats {
                    let name = at.name_any();
                    let still = later.fingerprints().remove(&name).unwrap_or_default();
                    for (slot, v) in then.tokens(&name) {
                        let fp = fingerprint(v.as_bytes());
                        let Some(claims) = claims_of(&v) else {
                            into.dishonest
                                .insert(format!("{name} {slot:?} ({fp}): not a JWT"));
                            continue;
                        };
                        let sub = format!("{ns}/{name}");
                        if claims["sub"].as_str() != Some(sub.as_str()) {
                            into.dishonest.insert(format!(
                                "{name} {slot:?} ({fp}): its sub claim is {}, not {sub}",
                                claims["sub"]
                            ));
                        }
                        let exp = claims["exp"].as_i64().unwrap_or(i64::MAX);
                        into.seen.entry(fp.clone()).or_insert(SeenJwt {
                            name: name.clone(),
                            exp,
                        });
                        let held = still.contains(&fp);
                        match then.entry_of(&name, &fp) {
                            Some(e) => {
                                let l = life(e);
                                if e.expires_at.as_ref().is_none_or(|x| x.0.as_second() < exp) {
                                    into.dishonest.insert(format!(
                                        "{name} ({fp}): exp {exp} is after its entry's expiresAt: {}",
                                        describe(Some(e))
                                    ));
                                }
                                let jti = claims["jti"].as_str().unwrap_or_default();
                                if e.handle.as_deref() != Some(format!("jwt:{jti}").as_str()) {
                                    into.dishonest.insert(format!(
                                        "{name} ({fp}): the entry's handle {:?} does not name its jti",
                                        e.handle
                                    ));
                                }
                                let honest = matches!(
                                    l,
                                    TokenLife::Live | TokenLife::Grace | TokenLife::Minting
                                );
                                if l == TokenLife::Revoked || (held && !honest) {
                                    into.dishonest.insert(format!(
                                        "{name} {slot:?} ({fp}): in its Secret, the ledger says {}",
                                        describe(Some(e))
                                    ));
                                }
                            }
                            None if held => {
                                into.dishonest.insert(format!(
                                    "{name} {slot:?} ({fp}): in its Secret before and after a read of the ledger that does not name it"
                                ));
                            }
                            None => {}
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The published JWKS (the issuer's ConfigMap `agents-jwks`).
    async fn jwks(&self) -> Option<jsonwebtoken::jwk::JwkSet> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), &self.ns);
        let cm = api.get_opt("agents-jwks").await.ok()??;
        serde_json::from_str(cm.data?.get("jwks.json")?).ok()
    }
}

/// Why `token` does not verify with `jwks` as a relying party would check
/// it (signature, issuer, audience, expiry); `None` when it does.
fn jwt_refused(jwks: &jsonwebtoken::jwk::JwkSet, token: &str) -> Option<String> {
    let header = jsonwebtoken::decode_header(token).ok()?;
    let Some(jwk) = header.kid.as_deref().and_then(|k| jwks.find(k)) else {
        return Some("its key is not published".into());
    };
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).ok()?;
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_issuer(&["https://agents.example"]);
    v.set_audience(&["https://api.internal"]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .err()
        .map(|e| e.to_string())
}

impl Issuer for JwtDelivered {
    fn kind(&self) -> &'static str {
        "jwt (self-signed)"
    }

    async fn account(&mut self, snap: &Snapshot) -> Tally {
        let mut t = Tally::default();
        let now = Timestamp::now().as_second();
        let mut seen = self.sampled.lock().unwrap().seen.clone();
        for at in &snap.ats {
            let name = at.name_any();
            for (_, v) in snap.tokens(&name) {
                let exp = claims_of(&v)
                    .and_then(|c| c["exp"].as_i64())
                    .unwrap_or(i64::MAX);
                seen.entry(fingerprint(v.as_bytes())).or_insert(SeenJwt {
                    name: name.clone(),
                    exp,
                });
            }
        }
        let named: BTreeSet<String> = self
            .observed
            .lock()
            .unwrap()
            .fingerprints
            .values()
            .flatten()
            .cloned()
            .collect();
        let held = snap.fingerprints();
        for (fp, j) in &seen {
            t.issued += 1;
            if held.get(&j.name).is_some_and(|f| f.contains(fp)) {
                t.in_secrets += 1;
                continue;
            }
            if now >= j.exp {
                t.expired += 1;
                continue;
            }
            match snap.entry_of(&j.name, fp) {
                Some(e) if covers_unknown(e) => {
                    t.unknown += 1;
                    t.unknown_keys.insert((j.name.clone(), e.revision));
                }
                Some(e) if life(e) == TokenLife::NotSupported => t.unrevocable += 1,
                Some(e) => t.problems.push(format!(
                    "{} ({fp}): out of its Secret, valid until {}; ledger: {}",
                    j.name,
                    j.exp,
                    describe(Some(e))
                )),
                // Its closed entry was pruned from the history since.
                None if named.contains(fp) => t.unrevocable += 1,
                None => t.leaked.push(format!(
                    "{}/{} ({fp}): seen in its Secret, valid until {}, the ledger never named it",
                    self.ns, j.name, j.exp
                )),
            }
        }
        self.unknown_entries = snap.entries().filter(|(_, e)| covers_unknown(e)).count();
        t
    }

    async fn revoked_but_active(
        &mut self,
        revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        // A JWT cannot be revoked: any entry called Revoked is wrong.
        revoked
            .iter()
            .map(|((name, rev), e)| {
                format!(
                    "{name} r{rev}: Revoked, but a JWT is valid until its exp: {}",
                    describe(Some(e))
                )
            })
            .collect()
    }

    async fn revoked_unrecorded(
        &mut self,
        _revoked: &BTreeMap<(String, i64), HistoryEntry>,
    ) -> Vec<String> {
        // Nobody revokes a JWT.
        Vec::new()
    }

    async fn minted_twice(&mut self) -> Vec<String> {
        // There is no issuer to ask; two tokens for one revision show as
        // two fingerprints for it in the ledger (`Observed::two_fingerprints`).
        Vec::new()
    }

    async fn not_honoured(&mut self, snap: &Snapshot) -> Vec<(String, String, String)> {
        let Some(jwks) = self.jwks().await else {
            return vec![(String::new(), String::new(), "no published JWKS".into())];
        };
        let mut out = Vec::new();
        for at in &snap.ats {
            let name = at.name_any();
            for (slot, v) in snap.tokens(&name) {
                if let Some(why) = jwt_refused(&jwks, &v) {
                    let fp = fingerprint(v.as_bytes());
                    let why =
                        format!("{name} {slot:?} ({fp}): does not verify with the JWKS: {why}");
                    out.push((name.clone(), fp, why));
                }
            }
        }
        out
    }

    fn watched(&mut self, observed: &Observed) -> (Vec<String>, Vec<String>) {
        self.sampler.abort();
        let sampled = self.sampled.lock().unwrap();
        let mut failures = Vec::new();
        if !sampled.dishonest.is_empty() {
            failures.push(format!(
                "JWTs in Secrets the ledger or the claims were wrong about ({}): {:#?}",
                sampled.dishonest.len(),
                sampled.dishonest.iter().take(30).collect::<Vec<_>>()
            ));
        }
        let named: BTreeSet<&String> = observed.fingerprints.values().flatten().collect();
        let unnamed: Vec<String> = sampled
            .seen
            .iter()
            .filter(|(fp, _)| !named.contains(fp))
            .map(|(fp, j)| format!("{} {fp}", j.name))
            .collect();
        if !unnamed.is_empty() {
            failures.push(format!(
                "JWTs seen in a Secret whose fingerprint the ledger never showed: {unnamed:#?}"
            ));
        }
        let notes = vec![format!(
            "{} JWTs seen delivered over {} reads of the Secrets; {} ledger entries Unknown at the end (a JWT signed and never delivered is invisible here: those entries cover it)",
            sampled.seen.len(),
            sampled.reads,
            self.unknown_entries
        )];
        (notes, failures)
    }

    async fn active_after_deletion(&mut self, _unknown: &BTreeSet<(String, i64)>) -> Vec<String> {
        // Every JWT ever delivered stays valid until its exp whatever
        // happens (the ledger said NotSupported): nothing can be asked.
        Vec::new()
    }
}

/// The jwt issuer: the operator signs 5-minute JWTs itself (ES256, a key
/// generated here). There is no external issuer to ask, and JWTs cannot be
/// revoked, so the truth is what was delivered: every JWT seen in a Secret
/// (read twice a second) must be named in the ledger by fingerprint, with
/// its `jti` as handle and an `expiresAt` not before its `exp`, `Live` or
/// `Grace` while in its Secret, never `Revoked`, `NotSupported` once out
/// (valid until `exp`); its claims name its AgentToken, and what the
/// Secrets hold verifies with the published JWKS.
///
/// What this test cannot see: a JWT signed by an operator killed before it
/// wrote it to the Secret. Nobody received it, but it exists and verifies
/// until its `exp`. The ledger covers it: its entry was written `Minting`
/// before signing, with an `expiresAt` at least the longest grant; the next
/// operator turns it `Unknown` (no fingerprint recorded) or, when the
/// fingerprint was recorded, `NotSupported` (findable, not revocable).
/// The test only counts those entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_jwt_self_signed_sigkill_during_signing_ledger_names_every_delivered_jwt() {
    let mut run = Run::new("jwt (self-signed)", "chaos-jwt").await;
    let pem = crate::jwt::key(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ]);
    crate::jwt::put_key(&run.ns, &pem).await;
    let issuer = json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": "agents"},
        "spec": {
            "jwt": {
                "signingKeySecretRef": {"name": "signing-key", "key": "key.pem"},
                "issuer": "https://agents.example",
            },
            "policy": {
                "maxLifetime": "10m",
                "allowedScopes": ["deploy"],
                "allowedAudiences": ["https://api.internal"],
            },
        },
    });
    applied(&run.ns, &issuer.to_string());
    let mut issuer = JwtDelivered::watch(&run.ns, run.observed.clone());
    run.drive(&mut issuer, |_| {
        json!({
            "issuerRef": {"name": "agents"},
            "scopes": ["deploy"],
            "audiences": ["https://api.internal"],
            "lifetime": "5m",
        })
    })
    .await;
}
