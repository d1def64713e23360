//! `colloquy login`: the code and 2FA password dialogue, written against
//! two small traits so it runs the same against Telegram and in tests.

use std::time::Duration;

use grammers_client::client::{LoginToken, PasswordToken};
use grammers_client::{Client, InvocationError, SignInError};

use super::errors::classify;
use crate::transport::SendError;

/// Why a login failed, in one sentence each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("the code is wrong; run `colloquy login` again and type the code Telegram sent")]
    WrongCode,
    #[error("the code has expired; run `colloquy login` again to get a new one")]
    ExpiredCode,
    #[error("the 2FA password is wrong")]
    WrongPassword,
    #[error("Telegram has banned the phone number {0}")]
    Banned(String),
    #[error("Telegram asks to wait before logging in again: try again in {}", short(*.0))]
    FloodWait(Duration),
    #[error("the phone number {0} has no Telegram account; sign-up of new accounts is out of scope: create it in an official Telegram app first")]
    SignUpRequired(String),
    #[error("the phone number {0} is invalid for Telegram")]
    InvalidPhone(String),
    #[error("{0}")]
    Input(String),
    #[error("Telegram cannot be reached: {0}")]
    Unreachable(String),
    #[error("the login failed: {0}")]
    Other(String),
}

impl LoginError {
    /// Whether what the user typed or passed was wrong (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            LoginError::WrongCode
                | LoginError::ExpiredCode
                | LoginError::WrongPassword
                | LoginError::InvalidPhone(_)
                | LoginError::Input(_)
        )
    }
}

/// `2h13m`, `5m`, `40s`.
pub fn short(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{sec}s"),
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    }
}

/// What a code or password step led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Logged in, as this user.
    Done(String),
    /// The account has 2FA: its password is needed.
    Password { hint: Option<String> },
}

/// The login steps Telegram offers.
#[allow(async_fn_in_trait)]
pub trait AuthStep {
    /// Whether the session is already logged in.
    async fn is_authorized(&mut self) -> Result<Option<String>, LoginError>;
    async fn request_code(&mut self, phone: &str) -> Result<(), LoginError>;
    async fn submit_code(&mut self, code: &str) -> Result<Step, LoginError>;
    async fn submit_password(&mut self, password: &str) -> Result<String, LoginError>;
}

/// Where the code and password come from.
pub trait Prompt {
    fn code(&mut self, phone: &str) -> Result<String, LoginError>;
    fn password(&mut self, hint: Option<&str>) -> Result<String, LoginError>;
    fn say(&mut self, line: &str);
}

/// Tries for a code or password typed at a terminal.
const TRIES: usize = 3;

/// Runs the dialogue; returns who is logged in.
pub async fn login(
    auth: &mut impl AuthStep,
    prompt: &mut impl Prompt,
    phone: &str,
) -> Result<String, LoginError> {
    if let Some(me) = auth.is_authorized().await? {
        return Ok(me);
    }
    auth.request_code(phone).await?;
    let mut step = None;
    for left in (0..TRIES).rev() {
        let code = prompt.code(phone)?;
        match auth.submit_code(code.trim()).await {
            Ok(s) => {
                step = Some(s);
                break;
            }
            Err(LoginError::WrongCode) if left > 0 => prompt.say("That code is wrong; try again."),
            Err(e) => return Err(e),
        }
    }
    let hint = match step {
        Some(Step::Done(me)) => return Ok(me),
        Some(Step::Password { hint }) => hint,
        None => return Err(LoginError::WrongCode),
    };
    for left in (0..TRIES).rev() {
        let password = prompt.password(hint.as_deref())?;
        match auth.submit_password(&password).await {
            Ok(me) => return Ok(me),
            Err(LoginError::WrongPassword) if left > 0 => {
                prompt.say("That password is wrong; try again.")
            }
            Err(e) => return Err(e),
        }
    }
    Err(LoginError::WrongPassword)
}

fn from_invocation(e: &InvocationError, phone: &str) -> LoginError {
    if e.is("PHONE_CODE_EXPIRED") {
        return LoginError::ExpiredCode;
    }
    if e.is("PHONE_CODE_INVALID") || e.is("PHONE_CODE_EMPTY") {
        return LoginError::WrongCode;
    }
    if e.is("PASSWORD_HASH_INVALID") {
        return LoginError::WrongPassword;
    }
    if e.is("PHONE_NUMBER_INVALID") {
        return LoginError::InvalidPhone(phone.to_string());
    }
    if e.is("PHONE_NUMBER_UNOCCUPIED") {
        return LoginError::SignUpRequired(phone.to_string());
    }
    match classify(e) {
        SendError::FloodWait(d) => LoginError::FloodWait(d),
        SendError::AccountBanned => LoginError::Banned(phone.to_string()),
        SendError::Transient(why) => LoginError::Unreachable(why),
        other => LoginError::Other(other.to_string()),
    }
}

/// Runs a library call on its own task, so a panic inside the library
/// becomes an error instead of ending the process.
async fn guarded<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, LoginError> {
    tokio::spawn(f).await.map_err(|e| {
        if e.is_panic() {
            LoginError::Other(super::errors::from_panic(e.into_panic()).to_string())
        } else {
            LoginError::Other("the login was interrupted".into())
        }
    })
}

fn describe(user: &grammers_client::peer::User) -> String {
    let mut name = user.full_name();
    if let Some(u) = user.username() {
        name.push_str(&format!(" (@{u})"));
    }
    name
}

/// The real steps, through a grammers client.
pub struct GrammersAuth {
    pub client: Client,
    pub api_hash: String,
    phone: String,
    token: Option<LoginToken>,
    password: Option<PasswordToken>,
}

impl GrammersAuth {
    pub fn new(client: Client, api_hash: String) -> GrammersAuth {
        GrammersAuth {
            client,
            api_hash,
            phone: String::new(),
            token: None,
            password: None,
        }
    }

    fn sign_in_error(&mut self, e: SignInError) -> Result<Step, LoginError> {
        match e {
            SignInError::PasswordRequired(t) => {
                let hint = t.hint().map(str::to_string);
                self.password = Some(t);
                Ok(Step::Password { hint })
            }
            SignInError::InvalidPassword(t) => {
                self.password = Some(t);
                Err(LoginError::WrongPassword)
            }
            SignInError::InvalidCode => Err(LoginError::WrongCode),
            SignInError::SignUpRequired => Err(LoginError::SignUpRequired(self.phone.clone())),
            SignInError::Other(e) => Err(from_invocation(&e, &self.phone)),
        }
    }
}

impl AuthStep for GrammersAuth {
    async fn is_authorized(&mut self) -> Result<Option<String>, LoginError> {
        let client = self.client.clone();
        let phone = self.phone.clone();
        match guarded(async move { client.get_me().await }).await? {
            Ok(me) => Ok(Some(describe(&me))),
            Err(e)
                if e.is("AUTH_KEY_UNREGISTERED")
                    || matches!(&e, InvocationError::Rpc(r) if r.code == 401) =>
            {
                Ok(None)
            }
            Err(e) => Err(from_invocation(&e, &phone)),
        }
    }

    async fn request_code(&mut self, phone: &str) -> Result<(), LoginError> {
        self.phone = phone.to_string();
        let (client, phone, hash) = (
            self.client.clone(),
            phone.to_string(),
            self.api_hash.clone(),
        );
        let p = phone.clone();
        let token = guarded(async move { client.request_login_code(&p, &hash).await })
            .await?
            .map_err(|e| from_invocation(&e, &phone))?;
        self.token = Some(token);
        Ok(())
    }

    async fn submit_code(&mut self, code: &str) -> Result<Step, LoginError> {
        let token = self
            .token
            .take()
            .ok_or_else(|| LoginError::Other("no code was requested".into()))?;
        let (client, code) = (self.client.clone(), code.to_string());
        let (token, result) = guarded(async move {
            let r = client.sign_in(&token, &code).await;
            (token, r)
        })
        .await?;
        self.token = Some(token);
        match result {
            Ok(me) => Ok(Step::Done(describe(&me))),
            Err(e) => self.sign_in_error(e),
        }
    }

    async fn submit_password(&mut self, password: &str) -> Result<String, LoginError> {
        let token = self
            .password
            .take()
            .ok_or_else(|| LoginError::Other("no password was asked for".into()))?;
        let (client, password) = (self.client.clone(), password.to_string());
        match guarded(async move { client.check_password(token, password).await }).await? {
            Ok(me) => Ok(describe(&me)),
            Err(e) => self.sign_in_error(e).map(|_| String::new()),
        }
    }
}

/// Prompts at the terminal; the password without echo. `--code` and
/// `--password-env` answer instead, for scripted use.
pub struct Terminal {
    pub code: Option<String>,
    pub password: Option<String>,
}

impl Prompt for Terminal {
    fn code(&mut self, phone: &str) -> Result<String, LoginError> {
        if let Some(c) = self.code.take() {
            return Ok(c);
        }
        eprint!("Telegram sent a login code to the app of {phone} (or by SMS); type it here: ");
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => Err(LoginError::Input(
                "no code was typed; pass it with --code when not at a terminal".into(),
            )),
            Ok(_) => Ok(line.trim().to_string()),
        }
    }

    fn password(&mut self, hint: Option<&str>) -> Result<String, LoginError> {
        if let Some(p) = self.password.take() {
            return Ok(p);
        }
        let prompt = match hint {
            Some(h) if !h.is_empty() => format!("2FA password (hint: {h}): "),
            _ => "2FA password: ".to_string(),
        };
        rpassword::prompt_password(prompt).map_err(|_| {
            LoginError::Input(
                "the account has a 2FA password and no terminal to type it; pass --password-env VAR".into(),
            )
        })
    }

    fn say(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Answers as a scripted Telegram would.
    struct FakeAuth {
        code: &'static str,
        password: Option<&'static str>,
        request: Option<LoginError>,
        expired: bool,
    }

    impl AuthStep for FakeAuth {
        async fn is_authorized(&mut self) -> Result<Option<String>, LoginError> {
            Ok(None)
        }
        async fn request_code(&mut self, _: &str) -> Result<(), LoginError> {
            self.request.clone().map_or(Ok(()), Err)
        }
        async fn submit_code(&mut self, code: &str) -> Result<Step, LoginError> {
            if self.expired {
                return Err(LoginError::ExpiredCode);
            }
            if code != self.code {
                return Err(LoginError::WrongCode);
            }
            Ok(match self.password {
                Some(_) => Step::Password {
                    hint: Some("pet".into()),
                },
                None => Step::Done("Alice".into()),
            })
        }
        async fn submit_password(&mut self, p: &str) -> Result<String, LoginError> {
            if Some(p) == self.password {
                Ok("Alice".into())
            } else {
                Err(LoginError::WrongPassword)
            }
        }
    }

    #[derive(Default)]
    struct Script {
        codes: VecDeque<&'static str>,
        passwords: VecDeque<&'static str>,
        hints: Vec<Option<String>>,
        said: Vec<String>,
    }

    impl Prompt for Script {
        fn code(&mut self, _: &str) -> Result<String, LoginError> {
            self.codes
                .pop_front()
                .map(str::to_string)
                .ok_or(LoginError::Input("no code".into()))
        }
        fn password(&mut self, hint: Option<&str>) -> Result<String, LoginError> {
            self.hints.push(hint.map(str::to_string));
            self.passwords
                .pop_front()
                .map(str::to_string)
                .ok_or(LoginError::Input("no password".into()))
        }
        fn say(&mut self, line: &str) {
            self.said.push(line.to_string());
        }
    }

    fn fake(password: Option<&'static str>) -> FakeAuth {
        FakeAuth {
            code: "12345",
            password,
            request: None,
            expired: false,
        }
    }

    #[tokio::test]
    async fn code_then_password_with_hint_and_retries() {
        let mut p = Script {
            codes: ["11111", "12345"].into(),
            passwords: ["wrong", "secret"].into(),
            ..Script::default()
        };
        let me = login(&mut fake(Some("secret")), &mut p, "+100")
            .await
            .unwrap();
        assert_eq!(me, "Alice");
        assert_eq!(
            p.hints,
            vec![Some("pet".to_string()), Some("pet".to_string())]
        );
        assert_eq!(
            p.said,
            vec![
                "That code is wrong; try again.",
                "That password is wrong; try again."
            ]
        );
    }

    #[tokio::test]
    async fn failures_are_one_sentence() {
        let mut p = Script {
            codes: ["1", "2", "3"].into(),
            ..Script::default()
        };
        let e = login(&mut fake(None), &mut p, "+100").await.unwrap_err();
        assert_eq!(e, LoginError::WrongCode);
        assert!(e.is_bad_input());

        let mut f = fake(None);
        f.expired = true;
        let mut p = Script {
            codes: ["12345"].into(),
            ..Script::default()
        };
        let e = login(&mut f, &mut p, "+100").await.unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");

        let mut f = fake(None);
        f.request = Some(LoginError::FloodWait(Duration::from_secs(
            2 * 3600 + 13 * 60,
        )));
        let e = login(&mut f, &mut Script::default(), "+100")
            .await
            .unwrap_err();
        assert!(e.to_string().ends_with("try again in 2h13m"), "{e}");
        assert!(!e.is_bad_input());

        let mut p = Script {
            codes: ["12345"].into(),
            passwords: ["a", "b", "c"].into(),
            ..Script::default()
        };
        let e = login(&mut fake(Some("secret")), &mut p, "+100")
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "the 2FA password is wrong");
    }

    #[test]
    fn telegram_errors_become_sentences() {
        use super::super::errors::rpc;
        let phone = "+15550001";
        assert_eq!(
            from_invocation(&rpc(400, "PHONE_CODE_EXPIRED"), phone),
            LoginError::ExpiredCode
        );
        assert_eq!(
            from_invocation(&rpc(420, "FLOOD_WAIT_7980"), phone).to_string(),
            "Telegram asks to wait before logging in again: try again in 2h13m"
        );
        assert_eq!(
            from_invocation(&rpc(400, "PHONE_NUMBER_BANNED"), phone).to_string(),
            "Telegram has banned the phone number +15550001"
        );
        assert!(from_invocation(&rpc(400, "PHONE_NUMBER_UNOCCUPIED"), phone)
            .to_string()
            .contains("sign-up of new accounts is out of scope"));
        assert_eq!(short(Duration::from_secs(40)), "40s");
        assert_eq!(short(Duration::from_secs(3600)), "1h");
    }
}
