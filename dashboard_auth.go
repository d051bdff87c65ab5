package main

// dashboard_auth.go: the dashboard's sessions (README, Dashboard). The
// login form takes the cluster's secret once; the answer is a session
// cookie that is not the secret: a random session ID and an expiry,
// signed with a key derived from the secret (HMAC-SHA256), so that every
// node of the cluster accepts it with no shared session store, and a new
// secret ends every session. Each state-changing request carries a CSRF
// token derived from the session ID with the same key; the login form,
// before there is a session, carries a random token that must match a
// short-lived cookie (double submit). Failed logins count against the
// webhooks' limit of failed attempts per address (auth.go's failLimiter).

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"net/http"
	"strings"
	"time"
)

const (
	sessionCookieName = "deployer_session"
	loginCookieName   = "deployer_login" // the login form's double-submit token
	csrfHeader        = "X-Csrf-Token"   // the session's CSRF token on each POST
	csrfField         = "csrf"           // the same in a form
	dashSessionTTL    = 12 * time.Hour   // a working day and some
	loginTokenTTL     = 30 * time.Minute // from the login form to its post
	sessionIDBytes    = 16
)

var (
	errNoSession = errors.New("no valid dashboard session: log in at /")
	errBadCSRF   = errors.New("missing or wrong CSRF token")
)

// dashAuth issues and checks the dashboard's session cookies and CSRF
// tokens. It holds no sessions: a cookie carries its own expiry and
// signature.
type dashAuth struct {
	secret   func() string // the cluster's secret; "" lets nobody in
	failures *failLimiter  // failed logins per address, shared with the webhooks
	ttl      time.Duration
	now      func() time.Time
}

func newDashAuth(secret func() string, failures *failLimiter) *dashAuth {
	return &dashAuth{secret: secret, failures: failures, ttl: dashSessionTTL, now: time.Now}
}

// key is the signing key: derived from the secret, never the secret, and
// nil while there is no secret.
func (a *dashAuth) key() []byte {
	s := a.secret()
	if s == "" {
		return nil
	}
	m := hmac.New(sha256.New, []byte(s))
	m.Write([]byte("deployer dashboard session v1"))
	return m.Sum(nil)
}

func (a *dashAuth) mac(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// checkSecret compares a secret given to the login form in constant time.
func (a *dashAuth) checkSecret(got string) bool {
	s := a.secret()
	return s != "" && subtle.ConstantTimeCompare([]byte(got), []byte(s)) == 1
}

// issue returns a new session cookie's value and its expiry:
// base64url(id ‖ expiry) "." base64url(HMAC(key, "session" ‖ id ‖ expiry)).
func (a *dashAuth) issue() (string, time.Time, error) {
	key := a.key()
	if key == nil {
		return "", time.Time{}, errNoSession
	}
	payload := make([]byte, sessionIDBytes+8)
	if _, err := rand.Read(payload[:sessionIDBytes]); err != nil {
		return "", time.Time{}, err
	}
	exp := a.now().Add(a.ttl).Truncate(time.Second)
	binary.BigEndian.PutUint64(payload[sessionIDBytes:], uint64(max(exp.Unix(), 0))) //nolint:gosec // not negative: max
	enc := base64.RawURLEncoding
	return enc.EncodeToString(payload) + "." + enc.EncodeToString(a.mac(key, []byte("session"), payload)), exp, nil
}

// session checks a session cookie's value and returns its ID and expiry.
func (a *dashAuth) session(value string) (id []byte, exp time.Time, ok bool) {
	key := a.key()
	p, s, found := strings.Cut(value, ".")
	if key == nil || !found {
		return nil, time.Time{}, false
	}
	enc := base64.RawURLEncoding
	payload, err1 := enc.DecodeString(p)
	sig, err2 := enc.DecodeString(s)
	if err1 != nil || err2 != nil || len(payload) != sessionIDBytes+8 || !hmac.Equal(sig, a.mac(key, []byte("session"), payload)) {
		return nil, time.Time{}, false
	}
	exp = time.Unix(int64(binary.BigEndian.Uint64(payload[sessionIDBytes:])), 0) //nolint:gosec // signed by us
	if !a.now().Before(exp) {
		return nil, time.Time{}, false
	}
	return payload[:sessionIDBytes], exp, true
}

// requestSession returns the ID and expiry of r's session, if it has a
// valid one.
func (a *dashAuth) requestSession(r *http.Request) ([]byte, time.Time, bool) {
	c, err := r.Cookie(sessionCookieName)
	if err != nil {
		return nil, time.Time{}, false
	}
	return a.session(c.Value)
}

// csrfToken is the CSRF token of session id.
func (a *dashAuth) csrfToken(id []byte) string {
	key := a.key()
	if key == nil {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString(a.mac(key, []byte("csrf"), id))
}

// checkCSRF reports whether r carries session id's CSRF token, in the
// header (fetch) or the form (a plain form post).
func (a *dashAuth) checkCSRF(r *http.Request, id []byte) bool {
	got := r.Header.Get(csrfHeader)
	if got == "" {
		got = r.PostFormValue(csrfField)
	}
	want := a.csrfToken(id)
	return want != "" && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// loginToken returns a fresh token for the login form, to be set both in
// its cookie and its hidden field.
func loginToken() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24)
	return base64.RawURLEncoding.EncodeToString(b)
}

// checkLoginToken reports whether the login form's field matches its
// cookie.
func checkLoginToken(r *http.Request) bool {
	c, err := r.Cookie(loginCookieName)
	got := r.PostFormValue(csrfField)
	return err == nil && c.Value != "" && subtle.ConstantTimeCompare([]byte(got), []byte(c.Value)) == 1
}

// cookie is one of the dashboard's cookies: HttpOnly, SameSite=Strict,
// Secure when the request came over TLS. maxAge < 0 deletes it.
func dashCookie(r *http.Request, name, value string, maxAge time.Duration) *http.Cookie {
	c := &http.Cookie{ //nolint:gosec // Secure only over HTTPS: a plain-HTTP -listen must still log in
		Name: name, Value: value, Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil,
		MaxAge: int(maxAge / time.Second),
	}
	if maxAge < 0 {
		c.MaxAge = -1
	}
	return c
}

// loginResult is what a login attempt comes to.
type loginResult int

const (
	loginOK loginResult = iota
	loginBadForm
	loginWrongSecret
	loginTooMany
)

// login checks a login form post: its double-submit token, then the
// secret. A wrong secret counts against the address's limit of failures;
// past it, the answer is loginTooMany (even for the right secret the
// limiter is not consulted: as with the webhooks, only failures count).
func (a *dashAuth) login(r *http.Request) (loginResult, time.Duration) {
	if !checkLoginToken(r) {
		return loginBadForm, 0
	}
	if a.checkSecret(r.PostFormValue("secret")) {
		return loginOK, 0
	}
	if ok, retry := a.failures.allow(r.RemoteAddr); !ok {
		return loginTooMany, retry
	}
	return loginWrongSecret, 0
}
