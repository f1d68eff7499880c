//! The traffic over time: the load's settings, the users each route object (VirtualService or
//! HTTPRoute) keeps between ticks (and the share of them replaced every second), and what one tick
//! sends and records.

use crate::MeshSimError;
use crate::requests::{RequestRecord, RouteKey, RouteKind, RouteObject, simulate_request};
use crate::routing::{MeshState, RegexCache};
use crate::users::{UserPool, VersionChange};
use rand::Rng;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// After a stall (a suspended laptop, a stopped debugger) catch up on at most this much traffic.
const MAX_CATCH_UP: Duration = Duration::from_secs(10);
/// The highest `--rps` accepted.
const MAX_RPS: f64 = 100_000.0;

/// The synthetic load.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficConfig {
    /// Requests per second sent through each route object.
    pub rps: f64,
    /// How often requests are generated and counted.
    pub tick: Duration,
    /// Share of users that carry the tester cookie `canary=true`.
    pub tester_share: f64,
    /// Simulated users per route object, each keeping its own cookies.
    pub users: usize,
    /// Share of each route object's users replaced per second by fresh users with no cookies,
    /// as new visitors arrive and others leave; 0 keeps the same users throughout.
    pub user_churn: f64,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            rps: 40.0,
            tick: Duration::from_millis(100),
            tester_share: 0.02,
            users: 500,
            user_churn: 0.0,
        }
    }
}

impl TrafficConfig {
    /// Rejects values the simulation cannot use, naming the option.
    pub fn validate(&self) -> Result<(), MeshSimError> {
        let invalid = |option, reason: &str| {
            Err(MeshSimError::InvalidOption {
                option,
                reason: reason.to_string(),
            })
        };
        // Every request is simulated one by one; far beyond this a tick outlasts its interval.
        if !self.rps.is_finite() || !(0.0..=MAX_RPS).contains(&self.rps) {
            return invalid("rps", "must be a number from 0 to 100000");
        }
        if self.tick.is_zero() {
            return invalid("tick", "must be longer than zero");
        }
        if !(0.0..=1.0).contains(&self.tester_share) {
            return invalid("tester-share", "must be between 0 and 1");
        }
        if self.users == 0 {
            return invalid("users", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.user_churn) {
            return invalid("user-churn", "must be between 0 and 1");
        }
        Ok(())
    }
}

/// One synthetic request as seen from its user, routed or not.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRequest {
    /// Namespace of the route object it went through.
    pub namespace: String,
    /// Name of that route object.
    pub route: String,
    pub route_kind: RouteKind,
    pub tester: bool,
    /// The workload Istio recorded it under; "" when unrouted.
    pub workload: String,
    pub change: Option<VersionChange>,
}

/// What one tick produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    pub records: Vec<RequestRecord>,
    /// Requests that matched no route, or that Envoy answered itself without reaching any
    /// workload's proxy (an unknown Service or subset, a rule with no backend to send to).
    pub unrouted: u32,
    /// Every request of the tick, by its user.
    pub user_requests: Vec<UserRequest>,
}

/// The state kept between ticks: the users of each route object, compiled regexes and the
/// fractions of a request and of a user replacement still owed.
#[derive(Debug)]
pub struct Simulator {
    config: TrafficConfig,
    // Ordered, so a seeded run draws the same numbers for the same pools.
    users: BTreeMap<RouteKey, UserPool>,
    regexes: RegexCache,
    owed: f64,
    churn_owed: f64,
}

impl Simulator {
    /// A simulator with no users yet; each route object gets its pool when first seen.
    pub fn new(config: TrafficConfig) -> Self {
        Self {
            config,
            users: BTreeMap::new(),
            regexes: RegexCache::default(),
            owed: 0.0,
            churn_owed: 0.0,
        }
    }

    /// The load it generates.
    pub fn config(&self) -> &TrafficConfig {
        &self.config
    }

    /// The users of the route object `key`, once it has had traffic.
    #[cfg(test)]
    pub fn users_of(&self, key: &RouteKey) -> Option<&UserPool> {
        self.users.get(key)
    }

    /// Requests each route object gets for `elapsed`; fractions carry over to the next call so
    /// low rates average out right.
    pub fn requests_for(&mut self, elapsed: Duration) -> u32 {
        self.owed += self.config.rps * elapsed.min(MAX_CATCH_UP).as_secs_f64();
        let whole = self.owed.floor();
        self.owed -= whole;
        whole as u32
    }

    /// Replaces the `user_churn` share per second of every pool's users, for `elapsed`, by fresh
    /// users; fractions carry over to the next call as in [`Simulator::requests_for`]. Returns how
    /// many users each pool had replaced.
    pub fn churn<R: Rng + ?Sized>(&mut self, elapsed: Duration, rng: &mut R) -> usize {
        let pool_size = self.config.users.max(1) as f64;
        self.churn_owed +=
            self.config.user_churn * pool_size * elapsed.min(MAX_CATCH_UP).as_secs_f64();
        let whole = self.churn_owed.floor();
        self.churn_owed -= whole;
        let count = whole as usize;
        if count > 0 {
            for pool in self.users.values_mut() {
                pool.replace(count, rng);
            }
        }
        count
    }

    /// Sends `requests` requests through every route object of `state`.
    pub fn tick<R: Rng + ?Sized>(
        &mut self,
        state: &MeshState,
        requests: u32,
        rng: &mut R,
    ) -> TickReport {
        let mut report = TickReport::default();
        let mut present = HashSet::new();
        for route in RouteObject::all(state) {
            let key = route.key();
            let pool = self
                .users
                .entry(key.clone())
                .or_insert_with(|| UserPool::new(self.config.users, self.config.tester_share));
            for _ in 0..requests {
                let (_, user) = pool.pick(rng);
                let outcome = simulate_request(state, route, user, rng, &mut self.regexes);
                report.user_requests.push(UserRequest {
                    namespace: key.namespace.clone(),
                    route: key.name.clone(),
                    route_kind: key.kind,
                    tester: user.tester,
                    workload: outcome
                        .record
                        .as_ref()
                        .map(|r| r.workload.clone())
                        .unwrap_or_default(),
                    change: outcome.change,
                });
                match outcome.record {
                    Some(record) => report.records.push(record),
                    None => report.unrouted += 1,
                }
            }
            present.insert(key);
        }
        // A route object that is gone takes its users' cookies with it.
        self.users.retain(|key, _| present.contains(key));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        CANARY_REV, ROUTERS, Router, STABLE_REV, count_by_workload, healthy_pods, no_testers,
        plain_release, rng, routes, state, tester_release,
    };
    use crate::run::SimRng;
    use rand::RngExt;
    use std::collections::BTreeSet;

    #[test]
    fn weights_95_5_are_honoured_over_many_requests() {
        for router in ROUTERS {
            let mesh = router.state(&plain_release(), &routes(5, true), &healthy_pods());
            let mut simulator = Simulator::new(no_testers());
            let report = simulator.tick(&mesh, 20_000, &mut rng());
            let counts = count_by_workload(&report);
            let canary = counts["lobe-chat-canary"] as f64 / 20_000.0;
            assert!(
                (canary - 0.05).abs() < 0.006,
                "{router:?}: canary share {canary}"
            );
            assert_eq!(
                counts["lobe-chat-stable"] + counts["lobe-chat-canary"],
                20_000,
                "{router:?}"
            );
            assert_eq!(report.unrouted, 0, "{router:?}");
        }
    }

    #[test]
    fn records_carry_the_destination_service_and_namespace_istio_reports() {
        // Through an HTTPRoute the destination proxy is the backend Service's.
        for (router, service) in [
            (Router::Istio, "lobe-chat.chat.svc.cluster.local"),
            (
                Router::GatewayApi,
                "lobe-chat-stable.chat.svc.cluster.local",
            ),
        ] {
            let mesh = router.state(&plain_release(), &routes(0, false), &healthy_pods());
            let report = Simulator::new(no_testers()).tick(&mesh, 10, &mut rng());
            assert_eq!(report.records.len(), 10, "{router:?}");
            for r in &report.records {
                assert_eq!(r.service, service);
                assert_eq!(r.namespace, "chat");
                assert_eq!(r.workload, "lobe-chat-stable");
                assert_eq!(r.response_code, 200);
            }
        }
    }

    #[test]
    fn tester_share_of_users_sends_that_share_of_requests_to_the_canary_at_weight_0() {
        for router in ROUTERS {
            let mesh = router.state(&tester_release(false), &routes(0, true), &healthy_pods());
            let report = Simulator::new(TrafficConfig::default()).tick(&mesh, 20_000, &mut rng());
            let canary = count_by_workload(&report)["lobe-chat-canary"] as f64 / 20_000.0;
            assert!(
                (canary - 0.02).abs() < 0.005,
                "{router:?}: canary share {canary}"
            );
        }
    }

    /// The subset each user was served by, across all their requests.
    fn versions_per_user(
        mesh: &MeshState,
        simulator: &mut Simulator,
        requests: usize,
        rng: &mut SimRng,
        seen: &mut BTreeMap<usize, BTreeSet<String>>,
    ) {
        let route = RouteObject::all(mesh).next().unwrap();
        let pool = simulator
            .users
            .entry(route.key())
            .or_insert_with(|| UserPool::new(200, 0.0));
        for _ in 0..requests {
            let (i, user) = pool.pick(rng);
            let record = simulate_request(mesh, route, user, rng, &mut simulator.regexes)
                .record
                .unwrap();
            seen.entry(i).or_default().insert(record.workload);
        }
    }

    #[test]
    fn a_sticky_cookie_keeps_each_user_on_one_version_both_ways() {
        for router in ROUTERS {
            let release = tester_release(true);
            let pods = healthy_pods();
            let mut simulator = Simulator::new(no_testers());
            let mut rng = rng();
            let mut seen = BTreeMap::new();
            let at_50 = router.state(&release, &routes(50, true), &pods);
            versions_per_user(&at_50, &mut simulator, 4_000, &mut rng, &mut seen);
            // Later steps move the split; users who already have a cookie stay where they are.
            let at_5 = router.state(&release, &routes(5, true), &pods);
            versions_per_user(&at_5, &mut simulator, 4_000, &mut rng, &mut seen);
            let at_100 = router.state(&release, &routes(100, true), &pods);
            versions_per_user(&at_100, &mut simulator, 4_000, &mut rng, &mut seen);

            let mut on = BTreeMap::<String, usize>::new();
            for (user, versions) in &seen {
                assert_eq!(
                    versions.len(),
                    1,
                    "{router:?}: user {user} saw {versions:?}"
                );
                *on.entry(versions.iter().next().unwrap().clone())
                    .or_default() += 1;
            }
            let stable = on["lobe-chat-stable"];
            let canary = on["lobe-chat-canary"];
            assert_eq!(stable + canary, 200, "{router:?}");
            assert!(
                stable > 60 && canary > 60,
                "{router:?}: stable {stable}, canary {canary}"
            );
            let pool = simulator.users_of(&router.key()).unwrap();
            assert!(
                pool.users()
                    .iter()
                    .all(|u| u.cookies.contains_key("chat-version")),
                "{router:?}"
            );
        }
    }

    #[test]
    fn after_a_rollback_canary_cookie_holders_return_to_stable_and_are_re_pinned() {
        for router in ROUTERS {
            let release = tester_release(true);
            let pods = healthy_pods();
            let mut simulator = Simulator::new(no_testers());
            let mut rng = rng();
            let at_100 = router.state(&release, &routes(100, true), &pods);
            simulator.tick(&at_100, 2_000, &mut rng);
            // Weights 100/0 and no canary rules: one write of the route object.
            let rolled_back = router.state(&release, &routes(0, false), &pods);
            let report = simulator.tick(&rolled_back, 2_000, &mut rng);
            assert_eq!(
                count_by_workload(&report),
                BTreeMap::from([("lobe-chat-stable".to_string(), 2_000)]),
                "{router:?}"
            );
            let pool = simulator.users_of(&router.key()).unwrap();
            let pinned: BTreeSet<_> = pool
                .users()
                .iter()
                .filter_map(|u| u.cookies.get("chat-version").cloned())
                .collect();
            assert!(pinned.contains(STABLE_REV), "{router:?}");
        }
    }

    #[test]
    fn the_rate_carries_fractions_between_ticks() {
        let mut simulator = Simulator::new(TrafficConfig::default());
        assert_eq!(simulator.requests_for(Duration::from_millis(100)), 4);
        let mut slow = Simulator::new(TrafficConfig {
            rps: 5.0,
            ..TrafficConfig::default()
        });
        let total: u32 = (0..10)
            .map(|_| slow.requests_for(Duration::from_millis(100)))
            .sum();
        assert_eq!(total, 5);
        assert_eq!(simulator.requests_for(Duration::from_secs(3600)), 400);
    }

    #[test]
    fn invalid_traffic_options_name_the_flag() {
        let bad = TrafficConfig {
            tester_share: 1.5,
            ..TrafficConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid --tester-share: must be between 0 and 1"
        );
        for (bad, flag) in [
            (
                TrafficConfig {
                    rps: -1.0,
                    ..TrafficConfig::default()
                },
                "--rps",
            ),
            (
                TrafficConfig {
                    rps: f64::NAN,
                    ..TrafficConfig::default()
                },
                "--rps",
            ),
            (
                TrafficConfig {
                    rps: 1e9,
                    ..TrafficConfig::default()
                },
                "--rps",
            ),
            (
                TrafficConfig {
                    tick: Duration::ZERO,
                    ..TrafficConfig::default()
                },
                "--tick",
            ),
            (
                TrafficConfig {
                    users: 0,
                    ..TrafficConfig::default()
                },
                "--users",
            ),
            (
                TrafficConfig {
                    user_churn: -0.1,
                    ..TrafficConfig::default()
                },
                "--user-churn",
            ),
            (
                TrafficConfig {
                    user_churn: 1.5,
                    ..TrafficConfig::default()
                },
                "--user-churn",
            ),
            (
                TrafficConfig {
                    user_churn: f64::NAN,
                    ..TrafficConfig::default()
                },
                "--user-churn",
            ),
        ] {
            let message = bad.validate().unwrap_err().to_string();
            assert!(
                message.starts_with(&format!("invalid {flag}: ")),
                "{message}"
            );
        }
        assert!(TrafficConfig::default().validate().is_ok());
        let whole_pool = TrafficConfig {
            user_churn: 1.0,
            ..TrafficConfig::default()
        };
        assert!(whole_pool.validate().is_ok());
    }

    #[test]
    fn a_removed_route_object_forgets_its_users() {
        let release = plain_release();
        let pods = healthy_pods();
        // Both, as while a ChatRelease switches router: two entry points, two pools.
        let mut mesh = state(&release, &routes(5, true), &pods);
        mesh.http_routes = Router::GatewayApi
            .state(&release, &routes(5, true), &pods)
            .http_routes;
        let mut simulator = Simulator::new(no_testers());
        simulator.tick(&mesh, 1, &mut rng());
        for router in ROUTERS {
            assert!(simulator.users_of(&router.key()).is_some(), "{router:?}");
        }
        mesh.virtual_services.clear();
        simulator.tick(&mesh, 1, &mut rng());
        assert!(simulator.users_of(&Router::Istio.key()).is_none());
        assert!(simulator.users_of(&Router::GatewayApi.key()).is_some());
        mesh.http_routes.clear();
        simulator.tick(&mesh, 1, &mut rng());
        assert!(simulator.users_of(&Router::GatewayApi.key()).is_none());
    }

    // --- Users who come and go ---

    fn served_users(simulator: &Simulator) -> usize {
        let pool = simulator.users_of(&Router::Istio.key()).unwrap();
        pool.users()
            .iter()
            .filter(|u| u.last_workload.is_some())
            .count()
    }

    #[test]
    fn churn_replaces_the_configured_share_of_users_per_second_with_fresh_ones() {
        let mesh = state(&tester_release(true), &routes(50, true), &healthy_pods());
        let mut simulator = Simulator::new(TrafficConfig {
            user_churn: 0.05,
            tester_share: 0.1,
            ..TrafficConfig::default()
        });
        let mut rng = rng();
        simulator.tick(&mesh, 20_000, &mut rng);
        assert_eq!(served_users(&simulator), 500);
        // One second: 5% of 500 users, each a different one.
        assert_eq!(simulator.churn(Duration::from_secs(1), &mut rng), 25);
        assert_eq!(served_users(&simulator), 475);
        // Ten seconds in ticks of 100 ms: 2.5 users a tick, the halves carried over.
        let replaced: usize = (0..100)
            .map(|_| simulator.churn(Duration::from_millis(100), &mut rng))
            .sum();
        assert_eq!(replaced, 250);
        // Some were replaced twice: a user survives each tick with probability 1 - 2.5/500.
        let fresh = 1.0 - served_users(&simulator) as f64 / 500.0;
        let expected = 1.0 - (1.0 - 0.05) * (1.0 - 0.005_f64).powi(100);
        assert!(
            (fresh - expected).abs() < 0.06,
            "{fresh} fresh, {expected} expected"
        );
        let pool = simulator.users_of(&Router::Istio.key()).unwrap();
        assert_eq!(pool.users().iter().filter(|u| u.tester).count(), 50);
        assert!(
            pool.users()
                .iter()
                .filter(|u| u.last_workload.is_none())
                .all(|u| u.cookies.is_empty() && u.pin.is_none())
        );
    }

    #[test]
    fn no_churn_keeps_every_user_and_draws_no_random_number() {
        let mesh = state(&tester_release(true), &routes(50, true), &healthy_pods());
        let mut simulator = Simulator::new(TrafficConfig::default());
        simulator.tick(&mesh, 20_000, &mut rng());
        let (mut used, mut untouched) = (rng(), rng());
        assert_eq!(simulator.churn(Duration::from_secs(3600), &mut used), 0);
        assert_eq!(used.random::<u64>(), untouched.random::<u64>());
        assert_eq!(served_users(&simulator), 500);
    }

    #[test]
    fn with_churn_a_sticky_canary_gets_its_weight_of_new_users() {
        let release = tester_release(true);
        let pods = healthy_pods();
        let at_5 = state(&release, &routes(5, true), &pods);
        let at_50 = state(&release, &routes(50, true), &pods);
        let mut rng = rng();
        let mut canary_share = |user_churn| {
            let mut simulator = Simulator::new(TrafficConfig {
                user_churn,
                ..no_testers()
            });
            simulator.tick(&at_5, 5_000, &mut rng);
            // A minute at 50%, at 40 requests a second.
            for _ in 0..600 {
                simulator.churn(Duration::from_millis(100), &mut rng);
                simulator.tick(&at_50, 4, &mut rng);
            }
            let pool = simulator.users_of(&Router::Istio.key()).unwrap();
            let pinned: Vec<&String> = pool
                .users()
                .iter()
                .filter_map(|u| u.cookies.get("chat-version"))
                .collect();
            pinned.iter().filter(|v| v.as_str() == CANARY_REV).count() as f64 / pinned.len() as f64
        };
        let same_users = canary_share(0.0);
        assert!(same_users < 0.1, "canary share without churn {same_users}");
        let churned = canary_share(0.05);
        assert!(churned > 0.35, "canary share with churn {churned}");
    }

    // --- What users see ---

    fn changes(report: &TickReport) -> Vec<VersionChange> {
        report
            .user_requests
            .iter()
            .filter_map(|r| r.change.clone())
            .collect()
    }

    #[test]
    fn user_requests_count_testers_and_regular_users_by_the_workload_that_served_them() {
        for router in ROUTERS {
            let mesh = router.state(&tester_release(false), &routes(0, true), &healthy_pods());
            let report = Simulator::new(TrafficConfig::default()).tick(&mesh, 20_000, &mut rng());
            assert_eq!(report.user_requests.len(), 20_000);
            let mut by_kind = BTreeMap::<(bool, &str), usize>::new();
            for r in &report.user_requests {
                assert_eq!(
                    (r.namespace.as_str(), r.route.as_str(), r.route_kind),
                    ("chat", "lobe-chat", router.kind())
                );
                *by_kind.entry((r.tester, r.workload.as_str())).or_default() += 1;
            }
            assert_eq!(by_kind.len(), 2, "{router:?}: {by_kind:?}");
            let testers = by_kind[&(true, "lobe-chat-canary")] as f64 / 20_000.0;
            assert!(
                (testers - 0.02).abs() < 0.005,
                "{router:?}: tester share {testers}"
            );
            assert_eq!(
                by_kind[&(false, "lobe-chat-stable")] + by_kind[&(true, "lobe-chat-canary")],
                20_000
            );
        }

        let mut unrouted = state(&tester_release(false), &routes(0, true), &healthy_pods());
        unrouted.destination_rules.clear();
        let report = Simulator::new(no_testers()).tick(&unrouted, 50, &mut rng());
        assert_eq!(report.user_requests.len(), 50);
        assert!(report.user_requests.iter().all(|r| r.workload.is_empty()));
        assert!(changes(&report).is_empty());
    }

    #[test]
    fn with_a_sticky_cookie_only_a_rollback_moves_pinned_users() {
        for router in ROUTERS {
            let release = tester_release(true);
            let pods = healthy_pods();
            // New users arrive as the weight grows, so the canary gets its share of them.
            let mut simulator = Simulator::new(TrafficConfig {
                user_churn: 0.05,
                ..no_testers()
            });
            let mut rng = rng();
            for weight in [5, 25, 50, 100] {
                let mesh = router.state(&release, &routes(weight, true), &pods);
                for _ in 0..10 {
                    simulator.churn(Duration::from_secs(1), &mut rng);
                    let report = simulator.tick(&mesh, 400, &mut rng);
                    assert_eq!(changes(&report), vec![], "{router:?} at {weight}%");
                }
            }
            let pool = simulator.users_of(&router.key()).unwrap();
            let on_canary = pool
                .users()
                .iter()
                .filter(|u| u.cookies.get("chat-version").map(String::as_str) == Some(CANARY_REV))
                .count();
            assert!(
                on_canary > 100,
                "{router:?}: {on_canary} users on the canary"
            );

            let rolled_back = router.state(&release, &routes(0, false), &pods);
            let report = simulator.tick(&rolled_back, 20_000, &mut rng);
            let moved = changes(&report);
            assert_eq!(moved.len(), on_canary, "{router:?}");
            let pinned_back = VersionChange {
                from: "lobe-chat-canary".into(),
                to: "lobe-chat-stable".into(),
                pinned: true,
            };
            assert!(
                moved.iter().all(|c| *c == pinned_back),
                "{router:?}: {moved:?}"
            );
            // Re-pinned to stable, they stay.
            let report = simulator.tick(&rolled_back, 4_000, &mut rng);
            assert_eq!(changes(&report), vec![], "{router:?}");
        }
    }

    #[test]
    fn without_a_sticky_cookie_users_move_both_ways_and_are_never_pinned() {
        let mesh = state(&plain_release(), &routes(50, true), &healthy_pods());
        let report = Simulator::new(no_testers()).tick(&mesh, 4_000, &mut rng());
        let moved = changes(&report);
        // Half of the requests after a user's first go to the other track.
        assert!(moved.len() > 1_500, "{} changes", moved.len());
        assert!(moved.iter().all(|c| !c.pinned));
        for (from, to) in [
            ("lobe-chat-stable", "lobe-chat-canary"),
            ("lobe-chat-canary", "lobe-chat-stable"),
        ] {
            assert!(moved.iter().any(|c| c.from == from && c.to == to));
        }
    }

    #[test]
    fn testers_taken_to_the_canary_by_their_match_route_are_not_pinned_changes() {
        for router in ROUTERS {
            let release = tester_release(true);
            let pods = healthy_pods();
            let mut simulator = Simulator::new(TrafficConfig::default());
            let mut rng = rng();
            // Before the canary: every user gets the stable's cookie.
            let before = router.state(&release, &routes(0, false), &pods);
            simulator.tick(&before, 20_000, &mut rng);
            let at_5 = router.state(&release, &routes(5, true), &pods);
            let report = simulator.tick(&at_5, 20_000, &mut rng);
            let moved: Vec<&UserRequest> = report
                .user_requests
                .iter()
                .filter(|r| r.change.is_some())
                .collect();
            // The 10 testers of 500 users, once each; canaryMatch comes before the cookie routes.
            assert_eq!(moved.len(), 10, "{router:?}");
            for r in moved {
                assert!(r.tester);
                let change = r.change.as_ref().unwrap();
                assert_eq!(
                    (change.from.as_str(), change.to.as_str(), change.pinned),
                    ("lobe-chat-stable", "lobe-chat-canary", false),
                    "{router:?}"
                );
            }
        }
    }
}
