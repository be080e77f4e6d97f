//! The bank account's business rules, decided without a store.

use cairn_domain::Aggregate;
use cairn_example_bank::{Account, Command, Error, Event, Status};

use crate::common::{deposit, open};

fn replay(events: &[Event]) -> Account {
    events.iter().fold(Account::default(), |s, e| s.evolve(e))
}

fn opened_with(balance: u64) -> Account {
    let mut events = vec![Event::AccountOpened { owner: "ada".into(), currency: "EUR".into() }];
    if balance > 0 {
        events.push(Event::MoneyDeposited { amount: balance, currency: "EUR".into(), note: None });
    }
    replay(&events)
}

#[test]
fn an_account_must_be_opened_once_before_use() {
    let new = Account::default();
    assert_eq!(new.decide(&deposit(5)), Err(Error::NotOpen));
    assert_eq!(new.decide(&Command::Withdraw { amount: 5 }), Err(Error::NotOpen));
    let events = new.decide(&open("ada")).unwrap();
    assert_eq!(events, vec![Event::AccountOpened { owner: "ada".into(), currency: "EUR".into() }]);
    let opened = replay(&events);
    assert_eq!(opened.status, Status::Open);
    assert_eq!(opened.decide(&open("bob")), Err(Error::AlreadyOpen));
}

#[test]
fn withdrawals_never_take_the_balance_below_zero() {
    let account = opened_with(100);
    assert_eq!(
        account.decide(&Command::Withdraw { amount: 101 }),
        Err(Error::InsufficientFunds { balance: 100, requested: 101 })
    );
    let events = account.decide(&Command::Withdraw { amount: 100 }).unwrap();
    assert_eq!(
        replay(
            &[
                vec![
                    Event::AccountOpened { owner: "ada".into(), currency: "EUR".into() },
                    Event::MoneyDeposited { amount: 100, currency: "EUR".into(), note: None }
                ],
                events
            ]
            .concat()
        )
        .balance,
        0
    );
}

#[test]
fn amounts_and_currencies_are_checked() {
    let account = opened_with(0);
    assert_eq!(account.decide(&deposit(0)), Err(Error::ZeroAmount));
    assert_eq!(account.decide(&Command::Withdraw { amount: 0 }), Err(Error::ZeroAmount));
    assert_eq!(
        account.decide(&Command::Deposit { amount: 5, currency: "USD".into(), note: None }),
        Err(Error::CurrencyMismatch { account: "EUR".into(), given: "USD".into() })
    );
}

#[test]
fn only_an_empty_account_closes_and_a_closed_one_refuses_everything() {
    assert_eq!(opened_with(1).decide(&Command::Close), Err(Error::NotEmpty(1)));
    let closed = opened_with(0).clone().evolve(&Event::AccountClosed);
    assert_eq!(closed.status, Status::Closed);
    for command in [deposit(1), Command::Withdraw { amount: 1 }, Command::Close] {
        assert_eq!(closed.decide(&command), Err(Error::Closed));
    }
    assert_eq!(closed.decide(&open("ada")), Err(Error::AlreadyOpen));
}
