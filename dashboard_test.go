package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// testDashboard is a dashboard on the test's etcd prefix with secret
// "s3cret" and a fake action "probe" that records its calls.
func testDashboard(t *testing.T) (*dashboard, *[]askedBy) {
	t.Helper()
	secret := "s3cret"
	d := newDashboard(testNS(t), func() string { return secret }, newFailLimiter(), dashOps{}, "n1", 1, testLogger(t))
	var calls []askedBy
	d.actions["probe"] = func(_ context.Context, _ []byte, asked askedBy) (any, error) {
		calls = append(calls, asked)
		return map[string]string{"ok": "yes"}, nil
	}
	return d, &calls
}

// dashMux serves the dashboard's routes as the daemon mounts them.
func dashMux(d *dashboard) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /{$}", d.index())
	mux.Handle("/ui/", d.handler())
	return mux
}

// login posts the login form as a browser would (first GET / for the
// form's token) and returns the response to the post.
func dashLogin(t *testing.T, h http.Handler, secret string, tls bool) *http.Response {
	t.Helper()
	get := httptest.NewRequest("GET", "/", nil)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, get)
	var token string
	for _, c := range w.Result().Cookies() {
		if c.Name == loginCookieName {
			token = c.Value
		}
	}
	if token == "" || !strings.Contains(w.Body.String(), `value="`+token+`"`) {
		t.Fatalf("GET / without a session: no login form with its token:\n%s", w.Body.String())
	}
	post := httptest.NewRequest("POST", "/ui/login", strings.NewReader(url.Values{"secret": {secret}, csrfField: {token}}.Encode()))
	post.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	post.AddCookie(&http.Cookie{Name: loginCookieName, Value: token})
	if tls {
		post.TLS = &tlsState
	}
	w = httptest.NewRecorder()
	h.ServeHTTP(w, post)
	return w.Result()
}

var tlsState = tls.ConnectionState{HandshakeComplete: true}

func sessionCookie(resp *http.Response) *http.Cookie {
	for _, c := range resp.Cookies() {
		if c.Name == sessionCookieName && c.Value != "" {
			return c
		}
	}
	return nil
}

func TestDashLoginCookie(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tls    bool
		secure bool
	}{
		{"http", false, false},
		{"https", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := testDashboard(t)
			resp := dashLogin(t, dashMux(d), "s3cret", tc.tls) //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
			c := sessionCookie(resp)
			if resp.StatusCode != http.StatusSeeOther || c == nil {
				t.Fatalf("login with the right secret: %d, cookie %v; want 303 and a session cookie", resp.StatusCode, c)
			}
			if !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || c.Secure != tc.secure || c.Path != "/" {
				t.Errorf("session cookie %q: HttpOnly %v SameSite %v Secure %v Path %q; want HttpOnly, Strict, Secure %v, /",
					c.String(), c.HttpOnly, c.SameSite, c.Secure, c.Path, tc.secure)
			}
			if c.MaxAge <= 0 || time.Duration(c.MaxAge)*time.Second > dashSessionTTL {
				t.Errorf("session cookie Max-Age %d; want an expiry within %v", c.MaxAge, dashSessionTTL)
			}
			if strings.Contains(c.Value, "s3cret") {
				t.Errorf("session cookie %q carries the secret", c.Value)
			}
			if _, _, ok := d.auth.session(c.Value); !ok {
				t.Errorf("the issued cookie is not a valid session")
			}
		})
	}
}

func TestDashSession(t *testing.T) {
	secret := "s3cret"
	now := time.Unix(1_700_000_000, 0)
	a := newDashAuth(func() string { return secret }, nil)
	a.now = func() time.Time { return now }
	value, _, err := a.issue()
	if err != nil {
		t.Fatal(err)
	}
	flip := func(s string, i int) string {
		b := []byte(s)
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
		return string(b)
	}
	dot := strings.IndexByte(value, '.')
	for _, tc := range []struct {
		name   string
		value  string
		secret string
		later  time.Duration
		want   bool
	}{
		{"issued", value, secret, 0, true},
		{"before expiry", value, secret, dashSessionTTL - time.Second, true},
		{"expired", value, secret, dashSessionTTL, false},
		{"payload changed", flip(value, 3), secret, 0, false},
		{"signature changed", flip(value, dot+3), secret, 0, false},
		{"no signature", value[:dot], secret, 0, false},
		{"the secret rotated", value, "n3w", 0, false},
		{"no secret", value, "", 0, false},
		{"the secret itself", secret, secret, 0, false},
		{"empty", "", secret, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newDashAuth(func() string { return tc.secret }, nil)
			b.now = func() time.Time { return now.Add(tc.later) }
			if _, _, ok := b.session(tc.value); ok != tc.want {
				t.Errorf("session(%q) ok = %v; want %v", tc.value, ok, tc.want)
			}
		})
	}
	// Two logins are two sessions, with different CSRF tokens.
	other, _, _ := a.issue()
	id1, _, _ := a.session(value)
	id2, _, _ := a.session(other)
	if a.csrfToken(id1) == a.csrfToken(id2) || a.csrfToken(id1) == "" {
		t.Errorf("CSRF tokens of two sessions: %q, %q; want two different ones", a.csrfToken(id1), a.csrfToken(id2))
	}
}

func TestDashCSRF(t *testing.T) {
	d, calls := testDashboard(t)
	h := dashMux(d)
	c := sessionCookie(dashLogin(t, h, "s3cret", false)) //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
	id, _, _ := d.auth.session(c.Value)
	token := d.auth.csrfToken(id)
	otherValue, _, _ := d.auth.issue()
	otherID, _, _ := d.auth.session(otherValue)

	for _, tc := range []struct {
		name    string
		path    string
		cookie  bool
		token   string
		form    bool   // the token in the form, not the header
		site    string // Sec-Fetch-Site
		want    int
		called  bool
		cleared bool // the session cookie is deleted
	}{
		{"action with the token", "/ui/action/probe", true, token, false, "same-origin", 200, true, false},
		{"action without the token", "/ui/action/probe", true, "", false, "same-origin", 403, false, false},
		{"action with a wrong token", "/ui/action/probe", true, "x" + token, false, "same-origin", 403, false, false},
		{"action with another session's token", "/ui/action/probe", true, d.auth.csrfToken(otherID), false, "same-origin", 403, false, false},
		{"action without a session", "/ui/action/probe", false, token, false, "same-origin", 401, false, false},
		{"action from another site", "/ui/action/probe", true, token, false, "cross-site", 403, false, false},
		{"unknown action", "/ui/action/nope", true, token, false, "same-origin", 404, false, false},
		{"logout without the token", "/ui/logout", true, "", true, "same-origin", 403, false, false},
		{"logout with the token", "/ui/logout", true, token, true, "same-origin", 303, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			*calls = nil
			body, ctype := `{}`, "application/json"
			if tc.form {
				body, ctype = url.Values{csrfField: {tc.token}}.Encode(), "application/x-www-form-urlencoded"
			}
			r := httptest.NewRequest("POST", tc.path, strings.NewReader(body))
			r.Header.Set("Content-Type", ctype)
			r.Header.Set("Sec-Fetch-Site", tc.site)
			if tc.cookie {
				r.AddCookie(c)
			}
			if !tc.form && tc.token != "" {
				r.Header.Set(csrfHeader, tc.token)
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != tc.want || (len(*calls) > 0) != tc.called {
				t.Fatalf("POST %s: %d, action called %v; want %d, %v (%s)", tc.path, w.Code, len(*calls) > 0, tc.want, tc.called, w.Body.String())
			}
			if tc.called && ((*calls)[0].Remote != r.RemoteAddr || (*calls)[0].Command != "dashboard probe" || (*calls)[0].Node != "n1") {
				t.Errorf("action asked by %+v; want the dashboard on n1 from %s", (*calls)[0], r.RemoteAddr)
			}
			if cleared := sessionCookie(w.Result()) == nil && strings.Contains(w.Header().Get("Set-Cookie"), sessionCookieName+"=;"); cleared != tc.cleared {
				t.Errorf("session cookie deleted: %v; want %v (Set-Cookie %q)", cleared, tc.cleared, w.Header().Get("Set-Cookie"))
			}
		})
	}
}

func TestDashLoginRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		post  func(h http.Handler) *http.Response
		want  int
		wants string
	}{
		{"wrong secret", func(h http.Handler) *http.Response { return dashLogin(t, h, "guess", false) }, 401, "Wrong secret"},
		{"empty secret", func(h http.Handler) *http.Response { return dashLogin(t, h, "", false) }, 401, "Wrong secret"},
		{"no form token", func(h http.Handler) *http.Response {
			r := httptest.NewRequest("POST", "/ui/login", strings.NewReader("secret=s3cret"))
			r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			return w.Result()
		}, 403, "form expired"},
		{"from another site", func(h http.Handler) *http.Response {
			r := httptest.NewRequest("POST", "/ui/login", strings.NewReader("secret=s3cret&csrf=x"))
			r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			r.Header.Set("Sec-Fetch-Site", "cross-site")
			r.AddCookie(&http.Cookie{Name: loginCookieName, Value: "x"})
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			return w.Result()
		}, 403, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := testDashboard(t)
			resp := tc.post(dashMux(d)) //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.want || sessionCookie(resp) != nil || !strings.Contains(string(body), tc.wants) {
				t.Errorf("login: %d, session cookie %v, body %q; want %d, none, %q", resp.StatusCode, sessionCookie(resp), body, tc.want, tc.wants)
			}
		})
	}
}

// TestDashLoginRateLimit: failed logins count against the webhooks'
// limit of failures per address (burst 10, then one a second); past it
// the form answers 429 with Retry-After, and a failed webhook from the
// same address counts too.
func TestDashLoginRateLimit(t *testing.T) {
	d, _ := testDashboard(t)
	now := time.Unix(1_700_000_000, 0)
	d.auth.failures.now = func() time.Time { return now }
	h := dashMux(d)
	var codes []int
	for range 10 {
		codes = append(codes, dashLogin(t, h, "guess", false).StatusCode) //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
	}
	for i, c := range codes {
		if c != http.StatusUnauthorized {
			t.Fatalf("failed login %d: %d; want 401 within the burst (%v)", i+1, c, codes)
		}
	}
	resp := dashLogin(t, h, "guess", false) //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("11th failed login: %d, Retry-After %q; want 429 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	// The right secret still logs in: only failures count.
	if resp := dashLogin(t, h, "s3cret", false); sessionCookie(resp) == nil { //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
		t.Errorf("the right secret past the limit: %d, no session; want a session", resp.StatusCode)
	}
	// One failure a second comes back; a failed webhook spends it.
	now = now.Add(time.Second)
	if ok, _ := d.auth.failures.allow("192.0.2.1:1234"); !ok {
		t.Fatal("the refilled failure was not allowed to the webhook")
	}
	if resp := dashLogin(t, h, "guess", false); resp.StatusCode != http.StatusTooManyRequests { //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
		t.Errorf("failed login after a failed webhook spent the refill: %d; want 429", resp.StatusCode)
	}
}

// TestDashRoutesNeedSession: without a session only the login form and
// the stylesheet are served.
func TestDashRoutesNeedSession(t *testing.T) {
	d, _ := testDashboard(t)
	h := dashMux(d)
	for _, tc := range []struct {
		path string
		want int
	}{
		{"/", 200},
		{"/ui/style.css", 200},
		{"/ui/app.js", 401},
		{"/ui/events", 401},
		{"/ui/nothing", 404},
	} {
		t.Run(tc.path, func(t *testing.T) {
			w := httptest.NewRecorder()
			h.ServeHTTP(w, httptest.NewRequest("GET", tc.path, nil))
			if w.Code != tc.want {
				t.Errorf("GET %s without a session: %d; want %d", tc.path, w.Code, tc.want)
			}
			if tc.path == "/" && (!strings.Contains(w.Body.String(), `name="secret"`) || strings.Contains(w.Body.String(), "app.js")) {
				t.Errorf("GET / without a session is not the login form alone:\n%s", w.Body.String())
			}
			if csp := w.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
				t.Errorf("GET %s: Content-Security-Policy %q", tc.path, csp)
			}
		})
	}
}

// TestDashEventsFollowEtcd: the stream sends the view at once, then again
// when a status record changes, with the revision that changed it; a
// progress write is not a change the page shows; closing the dashboard
// ends the stream.
func TestDashEventsFollowEtcd(t *testing.T) {
	d, _ := testDashboard(t)
	watches := &countingWatcher{Watcher: d.etcd}
	d.etcd = struct {
		clientv3.KV
		clientv3.Watcher
	}{d.etcd, watches}
	srv := httptest.NewServer(dashMux(d))
	t.Cleanup(srv.Close)
	jar, _ := cookiejar.New(nil)
	cl := &http.Client{Jar: jar}
	u, _ := url.Parse(srv.URL)
	c := sessionCookie(dashLogin(t, dashMux(d), "s3cret", false)) //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
	jar.SetCookies(u, []*http.Cookie{c})

	resp, err := cl.Get(srv.URL + "/ui/events") //nolint:bodyclose // an httptest recorder's in-memory body, or closed below
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != 200 || ct != "text/event-stream" {
		t.Fatalf("GET /ui/events: %d %q", resp.StatusCode, ct)
	}
	views := make(chan dashView)
	go func() {
		defer close(views)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				var v dashView
				if json.Unmarshal([]byte(data), &v) == nil {
					views <- v
				}
			}
		}
	}()
	next := func(what string) dashView {
		t.Helper()
		select {
		case v, ok := <-views:
			if !ok {
				t.Fatalf("%s: the stream ended", what)
			}
			return v
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no view within 10s", what)
		}
		return dashView{}
	}
	first := next("first view")
	if len(first.Nodes) != 0 || first.Node != "n1" {
		t.Fatalf("first view: %+v", first)
	}
	kv := testNS(t)
	// Not shown: a node's progress. Then a status record.
	if _, err := kv.Put(t.Context(), progressKey("n2"), "7"); err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(nodeStatus{Node: "n2", Version: "v9", Containers: []containerStatus{{Name: "app", Image: "reg/app:qa", ImageID: "sha256:aaaa"}}})
	put, err := kv.Put(t.Context(), statusKey("n2"), string(rec))
	if err != nil {
		t.Fatal(err)
	}
	v := next("view after the status record")
	if v.Rev != put.Header.Revision || len(v.Nodes) != 1 || len(v.Tags) != 1 || v.Tags[0].Cells[0].State != cellUpToDate {
		t.Fatalf("view after the status record (revision %d): %+v; want it, at that revision, with n2 up to date", put.Header.Revision, v)
	}
	// More changes come through the same watch.
	for i := range 3 {
		put, err := kv.Put(t.Context(), haltKey("reg/app:qa"), fmt.Sprintf(`{"image_id":"sha256:%d","node":"n2"}`, i))
		if err != nil {
			t.Fatal(err)
		}
		for v = next("view after a halt"); v.Rev < put.Header.Revision; v = next("view after a halt") {
		}
	}
	if n := watches.n.Load(); n != 1 {
		t.Errorf("%d etcd watches for one stream and 4 changes; want 1", n)
	}
	d.close()
	select {
	case _, ok := <-views:
		if ok {
			t.Fatal("a view after close; want the stream ended")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stream did not end within 10s of close")
	}
}

func TestBuildDashView(t *testing.T) {
	const ref = "reg/app:qa"
	newID, oldID, newerID := "sha256:"+strings.Repeat("b", 64), "sha256:"+strings.Repeat("a", 64), "sha256:"+strings.Repeat("c", 64)
	t0 := time.Unix(1_700_000_000, 0)
	node := func(name, id string) nodeStatus {
		return nodeStatus{Node: name, Containers: []containerStatus{{Name: "app", Image: ref, ImageID: id}}}
	}
	kv := func(key, value string, create int64) *mvccpb.KeyValue {
		return &mvccpb.KeyValue{Key: []byte(key), Value: []byte(value), CreateRevision: create}
	}
	hist := func(outcome string) historyView {
		return historyView{Tags: []tagHistory{{Image: ref, Versions: []ledgerVersion{
			{Version: 2, Image: ref, ImageID: newID, Outcome: outcome}, {Version: 1, Image: ref, ImageID: oldID, Outcome: outcomeRolledOut},
		}}}}
	}
	haltRec := &halt{ImageID: newID, Node: "n1", Reason: "exited"}
	for _, tc := range []struct {
		name    string
		nodes   []nodeStatus
		halted  *halt
		down    []string
		history historyView
		running []versionInfo // the status's versions, newest first
		rolls   []*mvccpb.KeyValue
		marks   []*mvccpb.KeyValue
		want    []string // the states of n1, n2, n3
		details []string // substrings of the details, "" for any
		records int
	}{
		{name: "rolled out", nodes: []nodeStatus{node("n1", newID), node("n2", newID), node("n3", newID)}, history: hist(outcomeRolledOut),
			want: []string{cellUpToDate, cellUpToDate, cellUpToDate}},
		{name: "a slot held, one waiting, one to go", nodes: []nodeStatus{node("n1", newID), node("n2", oldID), node("n3", oldID)}, history: hist(outcomeRollingOut),
			rolls: []*mvccpb.KeyValue{
				kv(slotsDir(ref)+"2-n3-x", "n3 app", 12), kv(slotsDir(ref)+"1-n2-x", "n2 app", 11),
			},
			want: []string{cellUpToDate, cellRolling, cellWaiting}},
		{name: "no container while replacing it", nodes: []nodeStatus{node("n1", newID), {Node: "n2"}, node("n3", oldID)}, history: hist(outcomeRollingOut),
			rolls: []*mvccpb.KeyValue{kv(slotsDir(ref)+"1-n2-x", "n2 app", 11)}, down: []string{"n2 app (not running)"},
			want: []string{cellUpToDate, cellRolling, cellRolling}},
		{name: "a version the ledger has yet to record", nodes: []nodeStatus{node("n1", oldID), node("n2", oldID), node("n3", newerID)},
			history: historyView{Tags: []tagHistory{{Image: ref, Versions: []ledgerVersion{{Version: 1, Image: ref, ImageID: oldID, Outcome: outcomeRolledOut, Pushed: t0}}}}},
			running: []versionInfo{{ImageID: newerID, Since: t0.Add(time.Minute)}, {ImageID: oldID, Since: t0}},
			want:    []string{cellRolling, cellRolling, cellUpToDate}},
		{name: "an old image restarted is not the newest", nodes: []nodeStatus{node("n1", newID), node("n2", newID), node("n3", oldID)},
			history: historyView{Tags: []tagHistory{{Image: ref, Versions: []ledgerVersion{{Version: 2, Image: ref, ImageID: newID, Outcome: outcomeRolledOut, Pushed: t0}}}}},
			running: []versionInfo{{ImageID: oldID, Since: t0.Add(-time.Minute)}, {ImageID: newID, Since: t0}},
			want:    []string{cellUpToDate, cellUpToDate, cellStale}},
		{name: "not yet queued", nodes: []nodeStatus{node("n1", newID), node("n2", oldID), node("n3", oldID)}, history: hist(outcomeRollingOut),
			want: []string{cellUpToDate, cellRolling, cellRolling}},
		{name: "halted", nodes: []nodeStatus{node("n1", oldID), node("n2", oldID), node("n3", oldID)}, history: hist(outcomeHalted), halted: haltRec,
			want: []string{cellHalted, cellHalted, cellHalted}, details: []string{"halted by n1: exited", "", ""}},
		{name: "down", nodes: []nodeStatus{node("n1", newID), node("n2", newID), node("n3", newID)}, history: hist(outcomeRolledOut), down: []string{"n2 app (unhealthy)"},
			want: []string{cellUpToDate, cellDown, cellUpToDate}, details: []string{"", "app (unhealthy)", ""}},
		{name: "stale", nodes: []nodeStatus{node("n1", newID), node("n2", newID), node("n3", oldID)}, history: hist(outcomeSuperseded),
			want: []string{cellUpToDate, cellUpToDate, cellStale}},
		{name: "marks of other features", nodes: []nodeStatus{node("n1", newID), node("n2", newID), node("n3", oldID)}, history: hist(outcomeRolledOut),
			rolls: []*mvccpb.KeyValue{kv(rolloutPrefix(ref)+"baking", `{"until":"soon"}`, 5)},
			marks: []*mvccpb.KeyValue{
				kv("/_pin/"+url.PathEscape(ref)+"/n3", `{"image_id":"a"}`, 6),
				kv("/_freeze/all", `{"reason":"incident 42"}`, 7),
			},
			want: []string{cellUpToDate, cellUpToDate, cellStale}, records: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := clusterStatus{Nodes: tc.nodes, Tags: []tagStatus{{Image: ref, Halted: tc.halted, Down: tc.down, Versions: tc.running}}}
			v := buildDashView(st, tc.history, tc.rolls, tc.marks, 1)
			if len(v.Tags) != 1 || len(v.Tags[0].Cells) != 3 {
				t.Fatalf("view: %+v", v)
			}
			for i, c := range v.Tags[0].Cells {
				if c.State != tc.want[i] {
					t.Errorf("%s: state %q (%s); want %q", c.Node, c.State, c.Detail, tc.want[i])
				}
				if tc.details != nil && !strings.Contains(c.Detail, tc.details[i]) {
					t.Errorf("%s: detail %q; want %q", c.Node, c.Detail, tc.details[i])
				}
			}
			if len(v.Records) != tc.records {
				t.Errorf("records naming no tag: %+v; want %d", v.Records, tc.records)
			}
			if tc.marks != nil {
				tag := v.Tags[0]
				words := []string{}
				for _, m := range tag.Marks {
					words = append(words, m.Word)
				}
				if strings.Join(words, ",") != "baking,pinned" || strings.Join(tag.Cells[2].Marks, ",") != "pinned" || v.Records[0].Word != "frozen" {
					t.Errorf("marks: tag %v, n3 %v, records %+v; want baking and pinned, n3 pinned, frozen for all", words, tag.Cells[2].Marks, v.Records)
				}
			}
			if got := v.Tags[0].Cells[0].Versions; tc.nodes[0].Containers[0].ImageID == newID && tc.running == nil && (len(got) != 1 || got[0] != 2) {
				t.Errorf("n1's version label %v; want [2]", got)
			}
		})
	}
}

// TestDaemonServesDashboard: the daemon mounts the dashboard at / and
// /ui/, and its stop is not held up by an open event stream.
func TestDaemonServesDashboard(t *testing.T) {
	td := startTestDaemon(t, testEtcd(t), newFakeDocker(), func(c *config) { c.WebhookSecret = "s3cret" })
	jar, _ := cookiejar.New(nil)
	cl := &http.Client{Jar: jar}
	resp, err := cl.Get(td.base + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindSubmatch(page)
	if m == nil {
		t.Fatalf("GET /: no login form:\n%s", page)
	}
	req, _ := http.NewRequest("POST", td.base+"/ui/login", strings.NewReader(url.Values{"secret": {"s3cret"}, csrfField: {string(m[1])}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if resp, err = cl.Do(req); err != nil {
		t.Fatal(err)
	}
	page, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(page), "/ui/app.js") {
		t.Fatalf("after login, GET / is not the dashboard: %d\n%s", resp.StatusCode, page)
	}
	resp, err = cl.Get(td.base + "/ui/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if line, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil || !strings.HasPrefix(line, "id: ") {
		t.Fatalf("event stream's first line %q, %v", line, err)
	}
	start := time.Now()
	td.stop()
	select {
	case err := <-td.done:
		if err != nil {
			t.Errorf("run with an open event stream = %v; want nil", err)
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("stop with an open event stream took %v", took)
		}
		td.done <- err // for the cleanup
	case <-time.After(20 * time.Second):
		t.Fatal("the daemon did not stop within 20s with an open event stream")
	}
}

// countingWatcher counts the watches opened.
type countingWatcher struct {
	clientv3.Watcher
	n atomic.Int32
}

func (w *countingWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	w.n.Add(1)
	return w.Watcher.Watch(ctx, key, opts...)
}
