//! A bank account as an event-sourced aggregate: open, deposit, withdraw (never
//! below zero), close (only when empty). Amounts are in cents.
//!
//! `MoneyDeposited` is at schema version 2: version 1 had no currency, and its
//! upcaster fills in the one old deposits were made in (`USD`).

pub mod demo;

use cairn_domain::{Aggregate, DomainEvent, Upcasters};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Open { owner: String, currency: String },
    Deposit { amount: u64, currency: String, note: Option<String> },
    Withdraw { amount: u64 },
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    AccountOpened {
        owner: String,
        currency: String,
    },
    MoneyDeposited {
        amount: u64,
        currency: String,
        /// The payer's reference, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    MoneyWithdrawn {
        amount: u64,
    },
    AccountClosed,
}

impl DomainEvent for Event {
    fn schema_version(event_type: &str) -> u32 {
        match event_type {
            "MoneyDeposited" => 2,
            _ => 1,
        }
    }

    fn upcasters() -> Upcasters {
        Upcasters::new().add("MoneyDeposited", 1, |mut data| {
            if let Some(fields) = data.as_object_mut() {
                fields.entry("currency").or_insert_with(|| "USD".into());
            }
            data
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the account is not open")]
    NotOpen,
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is closed")]
    Closed,
    #[error("insufficient funds: the balance is {}, the withdrawal {}", cents(*balance), cents(*requested))]
    InsufficientFunds { balance: u64, requested: u64 },
    #[error("an amount must be greater than zero")]
    ZeroAmount,
    #[error("the account holds {account}, not {given}")]
    CurrencyMismatch { account: String, given: String },
    #[error("an account can only be closed when empty; the balance is {}", cents(*.0))]
    NotEmpty(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Status {
    #[default]
    New,
    Open,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Account {
    pub status: Status,
    pub owner: String,
    pub currency: String,
    pub balance: u64,
}

impl Account {
    fn check_open(&self) -> Result<(), Error> {
        match self.status {
            Status::New => Err(Error::NotOpen),
            Status::Open => Ok(()),
            Status::Closed => Err(Error::Closed),
        }
    }
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = Command;
    type Event = Event;
    type Error = Error;

    fn decide(&self, command: &Command) -> Result<Vec<Event>, Error> {
        match command {
            Command::Open { owner, currency } => match self.status {
                Status::New => Ok(vec![Event::AccountOpened {
                    owner: owner.clone(),
                    currency: currency.clone(),
                }]),
                _ => Err(Error::AlreadyOpen),
            },
            Command::Deposit { amount, currency, note } => {
                self.check_open()?;
                if *amount == 0 {
                    return Err(Error::ZeroAmount);
                }
                if *currency != self.currency {
                    return Err(Error::CurrencyMismatch {
                        account: self.currency.clone(),
                        given: currency.clone(),
                    });
                }
                Ok(vec![Event::MoneyDeposited {
                    amount: *amount,
                    currency: currency.clone(),
                    note: note.clone(),
                }])
            }
            Command::Withdraw { amount } => {
                self.check_open()?;
                if *amount == 0 {
                    return Err(Error::ZeroAmount);
                }
                if *amount > self.balance {
                    return Err(Error::InsufficientFunds {
                        balance: self.balance,
                        requested: *amount,
                    });
                }
                Ok(vec![Event::MoneyWithdrawn { amount: *amount }])
            }
            Command::Close => {
                self.check_open()?;
                if self.balance > 0 {
                    return Err(Error::NotEmpty(self.balance));
                }
                Ok(vec![Event::AccountClosed])
            }
        }
    }

    fn evolve(mut self, event: &Event) -> Self {
        match event {
            Event::AccountOpened { owner, currency } => {
                self.status = Status::Open;
                self.owner = owner.clone();
                self.currency = currency.clone();
            }
            Event::MoneyDeposited { amount, .. } => self.balance += amount,
            // Saturating: evolve applies facts and must not panic on a history it did not decide.
            Event::MoneyWithdrawn { amount } => self.balance = self.balance.saturating_sub(*amount),
            Event::AccountClosed => self.status = Status::Closed,
        }
        self
    }
}

/// Formats cents as `12.34 EUR`.
pub fn money(amount: u64, currency: &str) -> String {
    format!("{} {currency}", cents(amount))
}

/// Formats cents as `12.34`.
pub fn cents(amount: u64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}

impl cairn_domain::Validate for Command {
    /// Input checks that need no state; the rules that do stay in `decide`.
    fn validate(&self) -> Result<(), cairn_domain::Invalid> {
        use cairn_domain::Invalid;
        let currency = |c: &str| {
            if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) {
                Ok(())
            } else {
                Err(Invalid::new(
                    "currency",
                    format!("{c:?} is not a three-letter ISO 4217 code such as EUR"),
                ))
            }
        };
        match self {
            Command::Open { owner, currency: c } => {
                if owner.trim().is_empty() {
                    return Err(Invalid::new("owner", "an account needs an owner's name"));
                }
                currency(c)
            }
            Command::Deposit { amount, currency: c, .. } => {
                if *amount == 0 {
                    return Err(Invalid::new("amount", "must be greater than zero"));
                }
                currency(c)
            }
            Command::Withdraw { amount } if *amount == 0 => {
                Err(Invalid::new("amount", "must be greater than zero"))
            }
            Command::Withdraw { .. } | Command::Close => Ok(()),
        }
    }
}
