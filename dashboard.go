package main

// dashboard.go: the web dashboard every node serves at / on -listen
// (README, Dashboard): a page and its assets embedded in the binary, a
// live view of the cluster pushed as Server-Sent Events, each fed by an
// etcd watch (no polling), and the actions the page offers. Sessions and
// CSRF tokens are dashboard_auth.go's; the view is dashboard_view.go's.
//
// Routes (config.go's builtinRoutes):
//
//	GET  /                 the page, or the login form without a session
//	GET  /ui/style.css     the stylesheet (the login form's too: open)
//	GET  /ui/app.js        the page's script
//	GET  /ui/events        the view, as Server-Sent Events
//	POST /ui/login         the login form: the cluster's secret
//	POST /ui/logout        ends the session in this browser
//	POST /ui/action/{name} an action (rollback, pin, unpin, promote, abort,
//	                       freeze, thaw), with the CSRF token

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
)

//go:embed dashboard
var dashboardFiles embed.FS

var dashboardTemplates = template.Must(template.ParseFS(dashboardFiles, "dashboard/*.html"))

// dashCSP lets the page load its own script and stylesheet and talk to
// its own node, and nothing else: no inline script, no other origin, no
// framing.
const dashCSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// dashKeepalive is how often an idle event stream gets a comment line,
// so that proxies and the browser see it alive.
const dashKeepalive = 25 * time.Second

// dashAction is one of the dashboard's actions, run for POST
// /ui/action/{name} with the request's JSON body; asked says who asked
// (the dashboard, the node, the browser's address). To add an action,
// add it to the map newDashboard builds and its button to ACTIONS in
// dashboard/app.js; the page shows the actions the view lists.
type dashAction func(ctx context.Context, body []byte, asked askedBy) (any, error)

// dashEtcd is what the dashboard reads and watches.
type dashEtcd interface {
	clientv3.KV
	clientv3.Watcher
}

// dashboard serves the page, its event streams and its actions.
type dashboard struct {
	etcd           dashEtcd // confined to -etcd_prefix
	auth           *dashAuth
	node           string
	maxUnavailable int
	actions        map[string]dashAction
	retryBase      time.Duration
	log            *slog.Logger

	closeOnce sync.Once
	closing   chan struct{} // closed at shutdown: event streams end
}

// dashOps are what the dashboard's actions call: the functions the API's
// handlers call. A nil one leaves its actions out.
type dashOps struct {
	rollback *rollbacker
	pins     *pinner
	canaries *canaries
	holds    *holdOps
	say      func(string) // announces a rollback, a pin or an unpin, as the API does; nil: not
}

// newDashboard returns node's dashboard on kv, letting in those who know
// secret, offering the actions ops has. It starts nothing.
func newDashboard(kv dashEtcd, secret func() string, failures *failLimiter, ops dashOps, node string, maxUnavailable int, log *slog.Logger) *dashboard {
	d := &dashboard{
		etcd: kv, auth: newDashAuth(secret, failures), node: node, maxUnavailable: maxUnavailable,
		actions: map[string]dashAction{}, retryBase: time.Second, log: log, closing: make(chan struct{}),
	}
	say := ops.say
	if say == nil {
		say = func(string) {}
	}
	if ops.rollback != nil {
		d.actions["rollback"] = rollbackAction(ops.rollback, say)
	}
	if ops.pins != nil {
		d.actions["pin"], d.actions["unpin"] = pinAction(ops.pins, say, false), pinAction(ops.pins, say, true)
	}
	if ops.canaries != nil {
		d.actions["promote"], d.actions["abort"] = canaryAction(ops.canaries, "promote"), canaryAction(ops.canaries, "abort")
	}
	if ops.holds != nil {
		d.actions["freeze"], d.actions["thaw"] = freezeAction(ops.holds), thawAction(ops.holds)
	}
	return d
}

// close ends the event streams (http.Server.Shutdown waits for handlers,
// and a stream never ends on its own).
func (d *dashboard) close() { d.closeOnce.Do(func() { close(d.closing) }) }

// handler serves the routes under /ui/.
func (d *dashboard) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ui/style.css", d.asset("style.css", "text/css; charset=utf-8"))
	mux.HandleFunc("GET /ui/app.js", d.requireSession(d.asset("app.js", "text/javascript; charset=utf-8")))
	mux.HandleFunc("GET /ui/events", d.requireSession(d.events))
	// Cross-origin posts are refused before anything else (Origin and
	// Sec-Fetch-Site), besides the tokens.
	cop := http.NewCrossOriginProtection()
	mux.Handle("POST /ui/login", cop.Handler(http.HandlerFunc(d.login)))
	mux.Handle("POST /ui/logout", cop.Handler(d.requireCSRF(d.logout)))
	mux.Handle("POST /ui/action/{name}", cop.Handler(d.requireCSRF(d.action)))
	return secureHeaders(mux)
}

// secureHeaders sets the headers every dashboard answer carries.
func secureHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", dashCSP)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		next.ServeHTTP(w, r)
	})
}

// GET /
//
// The page with a session; the login form without one.
func (d *dashboard) index() http.Handler {
	return secureHeaders(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, _, ok := d.auth.requestSession(r)
		if !ok {
			d.loginForm(w, r, http.StatusOK, "")
			return
		}
		d.render(w, http.StatusOK, "index.html", map[string]string{"Node": d.node, "CSRF": d.auth.csrfToken(id)})
	}))
}

func (d *dashboard) render(w http.ResponseWriter, code int, name string, data any) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	if err := dashboardTemplates.ExecuteTemplate(w, name, data); err != nil {
		d.log.Debug("dashboard page not written", "page", name, "err", err)
	}
}

// loginForm answers with the login form and a fresh double-submit token.
func (d *dashboard) loginForm(w http.ResponseWriter, r *http.Request, code int, message string) {
	token := loginToken()
	http.SetCookie(w, dashCookie(r, loginCookieName, token, loginTokenTTL))
	d.render(w, code, "login.html", map[string]string{"Node": d.node, "Token": token, "Message": message})
}

// POST /ui/login secret=…&csrf=…
func (d *dashboard) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 4<<10)
	res, retry := d.auth.login(r)
	switch res {
	case loginOK:
		value, exp, err := d.auth.issue()
		if err != nil {
			d.loginForm(w, r, http.StatusServiceUnavailable, "no session: "+err.Error())
			return
		}
		http.SetCookie(w, dashCookie(r, sessionCookieName, value, time.Until(exp)))
		http.SetCookie(w, dashCookie(r, loginCookieName, "", -1))
		d.log.Info("dashboard login", "remote", r.RemoteAddr)
		http.Redirect(w, r, "/", http.StatusSeeOther)
	case loginBadForm:
		d.loginForm(w, r, http.StatusForbidden, "The form expired; enter the secret again.")
	case loginWrongSecret:
		d.log.Warn("dashboard login refused", "remote", r.RemoteAddr, "err", errWrongSecret)
		d.loginForm(w, r, http.StatusUnauthorized, "Wrong secret.")
	case loginTooMany:
		d.log.Debug("dashboard login refused", "remote", r.RemoteAddr, "err", errTooManyFailures)
		w.Header().Set("Retry-After", strconv.Itoa(int(retry.Round(time.Second)/time.Second)+1))
		d.loginForm(w, r, http.StatusTooManyRequests, "Too many wrong secrets from your address; wait a little.")
	}
}

// POST /ui/logout csrf=…
func (d *dashboard) logout(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, dashCookie(r, sessionCookieName, "", -1))
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

// asset serves one embedded file.
func (d *dashboard) asset(name, contentType string) http.HandlerFunc {
	b, err := fs.ReadFile(dashboardFiles, "dashboard/"+name)
	if err != nil {
		panic(err) // embedded at build time
	}
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", contentType)
		_, _ = w.Write(b)
	}
}

// requireSession lets through requests with a valid session.
func (d *dashboard) requireSession(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := d.auth.requestSession(r); !ok {
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": errNoSession.Error()})
			return
		}
		next(w, r)
	}
}

// requireCSRF lets through requests with a valid session and its CSRF
// token.
func (d *dashboard) requireCSRF(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		id, _, ok := d.auth.requestSession(r)
		if !ok {
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": errNoSession.Error()})
			return
		}
		if !d.auth.checkCSRF(r, id) {
			d.log.Warn("dashboard request refused", "path", r.URL.Path, "remote", r.RemoteAddr, "err", errBadCSRF)
			writeJSON(w, http.StatusForbidden, map[string]string{"error": errBadCSRF.Error()})
			return
		}
		next(w, r)
	}
}

// POST /ui/action/{name}
func (d *dashboard) action(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	act, ok := d.actions[name]
	if !ok {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no action " + strconv.Quote(name)})
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("read body: %v", err)})
		return
	}
	d.log.Info("dashboard action", "action", name, "remote", r.RemoteAddr, "body", truncate(string(body), 200))
	res, err := act(r.Context(), body, askedBy{Command: "dashboard " + name, Host: d.node, Node: d.node, Remote: r.RemoteAddr})
	if err != nil {
		code := http.StatusServiceUnavailable
		switch {
		case errors.Is(err, errUsage), errors.Is(err, errLedgerTarget), errors.Is(err, errPolicy), errors.Is(err, errNotPinned):
			code = http.StatusBadRequest
		case errors.Is(err, errNoCanary), errors.Is(err, errNoFreeze):
			code = http.StatusNotFound
		case errors.Is(err, errCanaryOver):
			code = http.StatusConflict
		case errors.Is(err, errRegistryRefused):
			code = http.StatusBadGateway
		}
		d.log.Warn("dashboard action failed", "action", name, "remote", r.RemoteAddr, "status", code, "err", err)
		writeJSON(w, code, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// rollbackAction is deployer rollback from the dashboard: {"image":
// "repository:tag", "to": "…"}; announced as POST /api/rollback is.
func rollbackAction(rb *rollbacker, say func(string)) dashAction {
	return func(ctx context.Context, body []byte, asked askedBy) (any, error) {
		var req rollbackRequest
		if err := json.Unmarshal(body, &req); err != nil || req.Image == "" {
			return nil, fmt.Errorf(`%w: want {"image":"repository:tag","to":"…"}`, errUsage)
		}
		res, err := rb.rollback(ctx, req, asked)
		if err == nil {
			say(":rewind: " + strings.Join(res.lines(asked), "\n"))
		}
		return res, err
	}
}

// pinAction is deployer pin (or unpin) from the dashboard: {"image":
// "repository:tag", "to": "…"}; announced as POST /api/pin is.
func pinAction(p *pinner, say func(string), unpin bool) dashAction {
	return func(ctx context.Context, body []byte, asked askedBy) (any, error) {
		var req pinRequest
		if err := json.Unmarshal(body, &req); err != nil || req.Image == "" {
			return nil, fmt.Errorf(`%w: want {"image":"repository:tag","to":"…"}`, errUsage)
		}
		if unpin {
			res, old, err := p.unpin(ctx, req, asked)
			if err == nil {
				say(unpinAnnouncement(res, old, asked))
			}
			return res, err
		}
		res, from, err := p.pin(ctx, req, asked)
		if err == nil {
			say(pinAnnouncement(res, from, asked))
		}
		return res, err
	}
}

// canaryAction is deployer promote (or abort) from the dashboard:
// {"image": "repository:tag"}; the canary rollouts announce it.
func canaryAction(c *canaries, action string) dashAction {
	return func(ctx context.Context, body []byte, asked askedBy) (any, error) {
		var req struct {
			Image string `json:"image"` // as POST /api/promote's
		}
		if err := json.Unmarshal(body, &req); err != nil || req.Image == "" {
			return nil, fmt.Errorf(`%w: want {"image":"repository:tag"}`, errUsage)
		}
		ref, err := parseRollbackImage(req.Image, c.domain)
		if err != nil {
			return nil, err
		}
		if action == "promote" {
			return c.promote(ctx, ref, asked.who())
		}
		return c.abort(ctx, ref, asked.who())
	}
}

// freezeAction is deployer freeze from the dashboard: {"scope":
// "repository[:tag]", "until": "…", "reason": "…"}, no scope: every image.
func freezeAction(o *holdOps) dashAction {
	return func(ctx context.Context, body []byte, asked askedBy) (any, error) {
		var req freezeRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, fmt.Errorf(`%w: want {"scope":"repository[:tag]","until":"…","reason":"…"}`, errUsage)
		}
		return o.freeze(ctx, req, asked.who())
	}
}

// thawAction is deployer thaw from the dashboard: {"scope":
// "repository[:tag]"}, no scope: every image.
func thawAction(o *holdOps) dashAction {
	return func(ctx context.Context, body []byte, asked askedBy) (any, error) {
		var req freezeRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, fmt.Errorf(`%w: want {"scope":"repository[:tag]"}`, errUsage)
		}
		asked.Source = "dashboard thaw" // the released versions' triggers: the ledger's asker
		return o.thaw(ctx, req.Scope, asked)
	}
}

// GET /ui/events
//
// The view, once at once and again after each change in etcd that it
// shows: an etcd watch of the whole prefix from the revision read, a
// burst of changes read once. The stream ends with the session (the page
// then asks to log in again) and at shutdown.
func (d *dashboard) events(w http.ResponseWriter, r *http.Request) {
	_, exp, _ := d.auth.requestSession(r)
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	ctx, cancel := context.WithDeadline(r.Context(), exp)
	defer cancel()
	go func() {
		select {
		case <-d.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	write := func(s string) error {
		// The server's WriteTimeout is for requests; a stream's each
		// write gets its own.
		_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(w, s); err != nil {
			return err
		}
		return rc.Flush()
	}
	if err := d.stream(ctx, write); err != nil && ctx.Err() == nil {
		d.log.Debug("dashboard stream ended", "remote", r.RemoteAddr, "err", err)
	}
}

// stream sends the view through write after each change until ctx ends
// or a write fails. One watch, from the revision of the first view, lasts
// as long as the stream (watched again only when it fails): a change
// made while a view is read and sent waits in the watch's channel.
func (d *dashboard) stream(ctx context.Context, write func(string) error) error {
	keepalive := time.NewTicker(dashKeepalive)
	defer keepalive.Stop()
	actions := slices.Sorted(maps.Keys(d.actions))
	var ch clientv3.WatchChan
	stopWatch := func() {}
	defer func() { stopWatch() }()
	for attempt := 1; ; attempt++ {
		rctx, cancel := context.WithTimeout(ctx, callTimeout)
		v, err := readDashView(rctx, d.etcd, d.node, d.maxUnavailable, actions, time.Now())
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			b, _ := json.Marshal(map[string]string{"error": "etcd: " + err.Error()})
			if werr := write("event: problem\ndata: " + string(b) + "\n\n"); werr != nil {
				return werr
			}
			if !backoff.Sleep(ctx, backoff.Delay(d.retryBase, attempt)) {
				return nil
			}
			continue
		}
		attempt = 0
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if err := write(fmt.Sprintf("id: %d\nevent: view\ndata: %s\n\n", v.Rev, b)); err != nil {
			return err
		}
		if ch == nil {
			wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
			ch, stopWatch = d.etcd.Watch(wctx, "/", clientv3.WithPrefix(), clientv3.WithRev(v.Rev+1)), cancel
		}
		watching, err := waitChange(ctx, ch, v.Rev, keepalive.C, write)
		if err != nil || ctx.Err() != nil {
			return err
		}
		if !watching { // the watch failed: read the view again and watch from there
			stopWatch()
			ch = nil
		}
	}
}

// waitChange waits on a watch for a change after rev that the view
// shows, and drains what else is already there; it keeps the stream
// alive meanwhile. It returns false when the watch failed (the caller
// reads the view and watches again), and when ctx ended.
func waitChange(ctx context.Context, ch clientv3.WatchChan, rev int64, keepalive <-chan time.Time, write func(string) error) (bool, error) {
	for {
		select {
		case <-ctx.Done():
			return false, nil
		case <-keepalive:
			if err := write(": keepalive\n\n"); err != nil {
				return false, err
			}
		case resp, ok := <-ch:
			if !ok || resp.Err() != nil {
				return false, nil
			}
			if !shownChange(resp.Events, rev) {
				continue
			}
			for {
				select {
				case resp, ok := <-ch:
					if !ok || resp.Err() != nil {
						return false, nil
					}
				default:
					return true, nil
				}
			}
		}
	}
}

// shownChange reports whether events touch what the view shows, after
// rev (the view sent): not the nodes' progress, their name claims or the
// secret.
func shownChange(events []*clientv3.Event, rev int64) bool {
	for _, ev := range events {
		k := string(ev.Kv.Key)
		if ev.Kv.ModRevision <= rev {
			continue
		}
		if !slices.ContainsFunc([]string{"/" + nodesDir + "/", "/" + ownerDir + "/", "/" + secretDir + "/"}, func(p string) bool {
			return strings.HasPrefix(k, p)
		}) {
			return true
		}
	}
	return false
}
