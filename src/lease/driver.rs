//! Runs the [`Keeper`] against a [`LeaseStore`]: answers its requests (in
//! order, one outstanding at a time, feeding each answer back) and hands
//! its effects to the caller. The daemon drives etcd with it; unit tests
//! drive the in-memory store with it, on a test clock.

use super::keeper::{Action, Effect, Input, Keeper, Request};
use super::store::{LeaseStore, LeaseWatch, StoreError, WatchItem};
use std::collections::VecDeque;
use std::time::Instant;

pub struct Driver<'a, S: LeaseStore, C: Fn() -> Instant = fn() -> Instant> {
    pub store: &'a S,
    /// The running watch, once the keeper asked for one.
    pub watch: Option<S::Watch>,
    /// Actions not yet carried out.
    pub todo: VecDeque<Action>,
    /// The time the keeper is told.
    pub clock: C,
}

impl<'a, S: LeaseStore> Driver<'a, S> {
    /// A driver on the real clock.
    pub fn new(store: &'a S) -> Self {
        Driver {
            store,
            watch: None,
            todo: VecDeque::new(),
            clock: Instant::now,
        }
    }
}

impl<S: LeaseStore, C: Fn() -> Instant> Driver<'_, S, C> {
    /// Runs requests until none is left; returns the effects, in order.
    pub async fn pump(&mut self, keeper: &mut Keeper) -> Vec<Effect> {
        let mut effects = Vec::new();
        while let Some(a) = self.todo.pop_front() {
            let r = match a {
                Action::Request(r) => r,
                Action::Effect(e) => {
                    effects.push(e);
                    continue;
                }
            };
            let input = match r {
                Request::List => match self.store.list().await {
                    Ok((leases, revision)) => Input::Listed { leases, revision },
                    Err(e) => Input::Failed(e),
                },
                Request::GetConfig => match self.store.get_config().await {
                    Ok(text) => Input::Config(text),
                    Err(e) => Input::Failed(e),
                },
                Request::Write {
                    subnet,
                    value,
                    ttl,
                    expect,
                } => match self.store.write(subnet, value, ttl, expect).await {
                    Ok(w) => Input::Wrote(w),
                    Err(e) => Input::Failed(e),
                },
                Request::Watch { from } => match self.store.watch(from).await {
                    Ok(w) => {
                        self.watch = Some(w);
                        Input::WatchStarted
                    }
                    Err(e) => Input::Failed(e),
                },
                Request::Delete { subnet, expect } => {
                    match self.store.delete(subnet, expect).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(%subnet, "stale lease changed meanwhile; left alone")
                        }
                        Err(e) => tracing::warn!(%subnet, "deleting a stale lease failed: {e}"),
                    }
                    continue;
                }
            };
            self.todo.extend(keeper.handle(input, (self.clock)()));
        }
        effects
    }

    pub fn tick(&mut self, keeper: &mut Keeper) {
        self.todo.extend(keeper.handle(Input::Tick, (self.clock)()));
    }

    /// Hands the keeper what the watch gave (dropping a watch that ended).
    pub fn watched(&mut self, keeper: &mut Keeper, item: Result<WatchItem, StoreError>) {
        let input = match item {
            Ok(item) => {
                if item == WatchItem::Compacted {
                    self.watch = None;
                }
                Input::Watch(item)
            }
            Err(e) => {
                self.watch = None;
                Input::WatchBroken(e)
            }
        };
        self.todo.extend(keeper.handle(input, (self.clock)()));
    }
}

/// The next watch item (never, without a watch).
pub async fn next_item<W: LeaseWatch>(w: &mut Option<W>) -> Result<WatchItem, StoreError> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
