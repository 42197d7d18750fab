//! Logging in to and out of the dashboard.

use super::layout::{esc, page};
use crate::http::{auth, HttpState};
use axum::extract::{ConnectInfo, Form, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

fn login_page(s: &HttpState, msg: &str) -> Html<String> {
    let note = if auth::password_is_set(&s.data_dir) {
        String::new()
    } else {
        "<p class=\"bad\">No admin password is set: run <code>barngate admin set-password</code> on the gateway.</p>".into()
    };
    let mut b = format!("{note}<form id=\"login\" method=\"post\" action=\"/login\">");
    if !msg.is_empty() {
        let _ = write!(b, "<p class=\"bad\">{}</p>", esc(msg));
    }
    b.push_str("<label>Password <input type=\"password\" name=\"password\" autofocus></label> <button>Log in</button></form>");
    page(s, "Log in", &b)
}

pub async fn login_form(State(s): State<HttpState>) -> Response {
    if !s.require_login {
        return Redirect::to("/").into_response();
    }
    login_page(&s, "").into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    password: String,
}

/// Checks the password within the login limits ([`auth::LoginLimits`]):
/// 429 for a locked-out address and 503 when no check is free in time,
/// neither running argon2.
pub async fn login(
    State(s): State<HttpState>,
    peer: Option<ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let ip = crate::http::client_ip(peer.map(|c| c.0), &headers);
    let permit = match s.login.admit(ip).await {
        Ok(p) => p,
        Err(auth::NotChecked::LockedOut(left)) => {
            let secs = left.as_secs().max(1);
            tracing::warn!(client = %ip, retry_after_s = secs, "dashboard login refused: too many failures from this address");
            s.metrics.reject("login_locked_out");
            let page = login_page(
                &s,
                "Too many failed logins from this address; try again later.",
            );
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                page,
            )
                .into_response();
        }
        Err(auth::NotChecked::Busy) => {
            tracing::warn!(client = %ip, "dashboard login refused: password checks busy");
            s.metrics.reject("login_busy");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1".to_string())],
                login_page(&s, "The gateway is busy checking other logins; try again."),
            )
                .into_response();
        }
    };
    let m = s.metrics.clone();
    let running = m.login_checks_running.fetch_add(1, Ordering::Relaxed) + 1;
    m.login_checks_peak.fetch_max(running, Ordering::Relaxed);
    let dir = s.data_dir.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&dir, &f.password))
        .await
        .unwrap_or(false);
    m.login_checks_running.fetch_sub(1, Ordering::Relaxed);
    drop(permit);
    if !ok {
        let locked = s.login.failed(ip);
        tracing::warn!(client = %ip, locked_out = locked, "dashboard login failed");
        s.metrics.reject("login_failed");
        return (StatusCode::UNAUTHORIZED, login_page(&s, "Wrong password.")).into_response();
    }
    s.login.succeeded(ip);
    let token = s.sessions.create(s.clock.now());
    tracing::info!(client = %ip, "dashboard login");
    (
        [(
            header::SET_COOKIE,
            auth::set_cookie(&token, s.secure_cookie(&headers)),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

pub async fn logout(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(t) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::token_from_cookies)
    {
        s.sessions.remove(t);
    }
    (
        [(
            header::SET_COOKIE,
            auth::clear_cookie(s.secure_cookie(&headers)),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}
