//! Synthetic users: who sends each request, the cookies the mesh has set on them, the workload
//! that last served them, and the pool of one route object, whose users can come and go.

use rand::{Rng, RngExt};
use std::collections::BTreeMap;

/// The cookie testers carry, matched by the usual `canaryMatch` regex.
pub const TESTER_COOKIE: &str = "canary=true";
/// Path of every synthetic request: LobeChat's chat endpoint.
pub const REQUEST_PATH: &str = "/webapi/chat";
/// Method of every synthetic request: a chat is posted.
pub const REQUEST_METHOD: &str = "POST";
/// The pseudo-header Envoy holds the method in, and matches a `:method` header condition with.
pub const METHOD_HEADER: &str = ":method";

/// The parts of an HTTP request that route matching reads. Header names are lower case; the method
/// is the pseudo-header `:method`, as in Envoy's header map.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyntheticRequest {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
}

/// The sticky cookie the mesh last set on a user, and the workload whose answer set it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pin {
    pub cookie: String,
    pub value: String,
    pub workload: String,
}

/// A user served by one workload and, at their next request, by another.
///
/// `pinned` is true when the sticky cookie should have kept the user on `from`: a regular user
/// (not a tester) who, when sending this request, still held the cookie value that the mesh had
/// set (the `set-cookie` a weighted route's destination adds) with its answer from `from`. So a
/// pinned change is a broken pin: with a sticky cookie there is none while both tracks keep their
/// cookie routes, and each user pinned to a track that loses its route (the canary after a
/// rollback) moves once. Testers are never pinned: their `canaryMatch` routes come before the
/// cookie routes by design. An unrouted request has no workload, so it is never `from` or `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionChange {
    pub from: String,
    pub to: String,
    pub pinned: bool,
}

/// One simulated user: a tester or not, the cookies the mesh has set on them, and what the last
/// answers left them with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct User {
    pub tester: bool,
    pub cookies: BTreeMap<String, String>,
    /// The workload that served the last request; `None` before the first or after an unrouted one.
    pub last_workload: Option<String>,
    /// The sticky cookie the mesh last set, if any.
    pub pin: Option<Pin>,
}

/// `(name, value)` of a `set-cookie` header value (`name=value; Path=/; ...`).
fn cookie_pair(set_cookie: &str) -> Option<(&str, &str)> {
    let pair = set_cookie.split(';').next().unwrap_or_default();
    let (name, value) = pair.split_once('=')?;
    let name = name.trim();
    (!name.is_empty()).then_some((name, value.trim()))
}

impl User {
    /// A user who has not been served yet: no cookies.
    pub fn fresh(tester: bool) -> Self {
        Self {
            tester,
            ..Self::default()
        }
    }

    /// The user's next request: testers send `canary=true` before the cookies they hold.
    pub fn request(&self) -> SyntheticRequest {
        let mut cookies: Vec<String> = Vec::new();
        if self.tester {
            cookies.push(TESTER_COOKIE.to_string());
        }
        cookies.extend(self.cookies.iter().map(|(k, v)| format!("{k}={v}")));
        let mut headers = BTreeMap::from([(METHOD_HEADER.to_string(), REQUEST_METHOD.to_string())]);
        if !cookies.is_empty() {
            headers.insert("cookie".to_string(), cookies.join("; "));
        }
        SyntheticRequest {
            path: REQUEST_PATH.to_string(),
            headers,
            query: BTreeMap::new(),
        }
    }

    /// Keeps the cookie of a `set-cookie` header value (`name=value; Path=/; ...`) as a browser
    /// would; attributes are ignored.
    pub fn remember(&mut self, set_cookie: &str) {
        if let Some((name, value)) = cookie_pair(set_cookie) {
            self.cookies.insert(name.to_string(), value.to_string());
        }
    }

    /// The workload the user's sticky cookie holds them to (see [`VersionChange`]).
    fn pinned_to(&self) -> Option<&str> {
        let pin = self.pin.as_ref().filter(|_| !self.tester)?;
        let held = self.cookies.get(&pin.cookie) == Some(&pin.value);
        held.then_some(pin.workload.as_str())
    }

    /// Takes in the answer to a request: `workload` served it (`None`: it reached no workload)
    /// and its route's destination added `set_cookie`, if any. Returns the change of workload it
    /// makes, judged by the cookies held when the request was sent.
    pub fn answered(
        &mut self,
        workload: Option<&str>,
        set_cookie: Option<&str>,
    ) -> Option<VersionChange> {
        let workload = workload.filter(|w| !w.is_empty());
        let change = match (self.last_workload.as_deref(), workload) {
            (Some(from), Some(to)) if from != to => Some(VersionChange {
                from: from.to_string(),
                to: to.to_string(),
                pinned: self.pinned_to() == Some(from),
            }),
            _ => None,
        };
        if let Some(set_cookie) = set_cookie {
            self.remember(set_cookie);
            self.pin = cookie_pair(set_cookie)
                .zip(workload)
                .map(|((cookie, value), workload)| Pin {
                    cookie: cookie.to_string(),
                    value: value.to_string(),
                    workload: workload.to_string(),
                });
        }
        self.last_workload = workload.map(str::to_string);
        change
    }
}

/// The users of one route object (VirtualService or HTTPRoute). The first `tester_share` of them
/// are testers, so testers send that share of the requests.
#[derive(Debug, Clone)]
pub struct UserPool {
    users: Vec<User>,
}

impl UserPool {
    /// `size` users (at least one), `tester_share` of them testers.
    pub fn new(size: usize, tester_share: f64) -> Self {
        let size = size.max(1);
        let testers = (size as f64 * tester_share.clamp(0.0, 1.0)).round() as usize;
        let users = (0..size).map(|i| User::fresh(i < testers)).collect();
        Self { users }
    }

    /// A user chosen uniformly at random.
    pub fn pick<R: Rng + ?Sized>(&mut self, rng: &mut R) -> (usize, &mut User) {
        let i = rng.random_range(0..self.users.len());
        (i, &mut self.users[i])
    }

    /// Replaces `count` users chosen at random, each at most once (all of them when `count` is
    /// the pool's size or more), by fresh users with no cookies. A tester is replaced by a tester,
    /// so the tester share stays.
    pub fn replace<R: Rng + ?Sized>(&mut self, count: usize, rng: &mut R) {
        let count = count.min(self.users.len());
        for i in rand::seq::index::sample(rng, self.users.len(), count) {
            self.users[i] = User::fresh(self.users[i].tester);
        }
    }

    /// All users, in order.
    #[cfg(test)]
    pub fn users(&self) -> &[User] {
        &self.users
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::rng;

    const STABLE: &str = "lobe-chat-stable";
    const CANARY: &str = "lobe-chat-canary";
    const STABLE_COOKIE: &str = "chat-version=aaaa111111; Path=/";
    const CANARY_COOKIE: &str = "chat-version=bbbb222222; Path=/";

    #[test]
    fn a_move_away_from_the_workload_whose_cookie_the_user_holds_is_pinned() {
        let mut user = User::fresh(false);
        assert_eq!(user.answered(Some(CANARY), Some(CANARY_COOKIE)), None);
        // Kept there by the cookie route, which sets no cookie.
        assert_eq!(user.answered(Some(CANARY), None), None);
        assert_eq!(
            user.answered(Some(STABLE), Some(STABLE_COOKIE)),
            Some(VersionChange {
                from: CANARY.into(),
                to: STABLE.into(),
                pinned: true
            })
        );
        assert_eq!(user.cookies["chat-version"], "aaaa111111");
        assert_eq!(user.pin.as_ref().unwrap().workload, STABLE);
    }

    #[test]
    fn a_move_without_a_sticky_cookie_is_not_pinned() {
        let mut user = User::fresh(false);
        user.answered(Some(STABLE), None);
        let change = user.answered(Some(CANARY), None).unwrap();
        assert_eq!((change.from.as_str(), change.pinned), (STABLE, false));
        // The cookie was set by the other workload's answer: it pins the user to that one.
        let mut user = User::fresh(false);
        user.answered(Some(STABLE), Some(STABLE_COOKIE));
        user.answered(Some(CANARY), None);
        let change = user.answered(Some(STABLE), None).unwrap();
        assert_eq!((change.from.as_str(), change.pinned), (CANARY, false));
    }

    #[test]
    fn a_user_who_lost_the_cookie_or_is_a_tester_is_not_pinned() {
        let mut user = User::fresh(false);
        user.answered(Some(STABLE), Some(STABLE_COOKIE));
        user.remember("chat-version=other");
        assert!(!user.answered(Some(CANARY), None).unwrap().pinned);
        let mut tester = User::fresh(true);
        tester.answered(Some(STABLE), Some(STABLE_COOKIE));
        assert!(!tester.answered(Some(CANARY), None).unwrap().pinned);
    }

    #[test]
    fn an_unrouted_request_is_never_one_side_of_a_change() {
        let mut user = User::fresh(false);
        user.answered(Some(STABLE), Some(STABLE_COOKIE));
        assert_eq!(user.answered(None, Some(CANARY_COOKIE)), None);
        assert_eq!(user.last_workload, None);
        // The cookie is set all the same, but pins the user to no workload.
        assert_eq!(user.cookies["chat-version"], "bbbb222222");
        assert_eq!(user.pin, None);
        assert_eq!(user.answered(Some(CANARY), None), None);
        assert_eq!(user.answered(Some(""), None), None);
    }

    #[test]
    fn replaced_users_are_fresh_and_testers_stay_testers() {
        let mut pool = UserPool::new(100, 0.1);
        let mut rng = rng();
        for i in 0..100 {
            pool.users[i].answered(Some(STABLE), Some(STABLE_COOKIE));
        }
        pool.replace(30, &mut rng);
        let fresh: Vec<&User> = pool
            .users()
            .iter()
            .filter(|u| u.cookies.is_empty())
            .collect();
        assert_eq!(fresh.len(), 30);
        assert!(
            fresh
                .iter()
                .all(|u| u.last_workload.is_none() && u.pin.is_none())
        );
        assert_eq!(pool.users().iter().filter(|u| u.tester).count(), 10);
        pool.replace(1_000, &mut rng);
        assert!(pool.users().iter().all(|u| u.cookies.is_empty()));
        assert_eq!(pool.users().iter().filter(|u| u.tester).count(), 10);
        pool.replace(0, &mut rng);
        assert_eq!(pool.users().len(), 100);
    }
}
