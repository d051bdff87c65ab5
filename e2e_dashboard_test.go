//go:build e2e

package main

// e2e_dashboard_test.go: the dashboard in a real browser (Debian's
// chromium, headless, driven with chromedp) against the real stack: the
// login, a deploy across the three nodes watched on the page, how long a
// change in etcd takes to reach the page, a rollback from the page, and
// what the page refuses and never loads. Screenshots go to
// $E2E_ARTIFACTS/dashboard (default: $TMPDIR/deployer-e2e-dashboard).

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// dashArtifacts is where the browser test saves its screenshots.
func dashArtifacts(t *testing.T) string {
	dir := filepath.Join(os.TempDir(), "deployer-e2e-dashboard")
	if d := os.Getenv("E2E_ARTIFACTS"); d != "" {
		dir = filepath.Join(d, "dashboard")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// browser starts a headless chromium and records every request its pages
// make; errors is what the page's script reported as errors or threw.
func browser(t *testing.T) (ctx context.Context, requests, errors func() []string) {
	t.Helper()
	exe, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium not found: run scripts/install-deps.sh (make test does) first")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(exe), chromedp.NoSandbox,
		chromedp.WindowSize(1440, 1000), chromedp.DisableGPU, chromedp.Flag("no-proxy-server", true))
	actx, cancelAlloc := chromedp.NewExecAllocator(t.Context(), opts...)
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(func() { cancel(); cancelAlloc() })
	// The first call starts the browser, on a context without a deadline.
	if _, err := chromedp.Call(ctx, network.Enable, network.EnableParams{}); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	var mu sync.Mutex
	var urls []string
	sent := chromedp.Events(ctx, network.RequestWillBeSent)
	go func() {
		for ev, err := range sent {
			if err != nil {
				return
			}
			mu.Lock()
			urls = append(urls, ev.Request.URL)
			mu.Unlock()
		}
	}()
	var failed []string
	console := chromedp.Console(ctx)
	go func() {
		for m, err := range console {
			if err != nil {
				return
			}
			// The browser's own log says "error" for each 401 and 403 the
			// test asks for; the script's errors and exceptions count.
			if m.Type == chromedp.ConsoleException || (m.Type == chromedp.ConsoleError && m.Source == "") {
				mu.Lock()
				failed = append(failed, fmt.Sprintf("%s: %s", m.Type, m.Text))
				mu.Unlock()
			}
		}
	}()
	lock := func(f func() []string) func() []string {
		return func() []string {
			mu.Lock()
			defer mu.Unlock()
			return slices.Clone(f())
		}
	}
	return ctx, lock(func() []string { return urls }), lock(func() []string { return failed })
}

// brun runs browser steps with a bound, failing the test with what.
func brun(t *testing.T, ctx context.Context, d time.Duration, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	tctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if err := chromedp.Do(tctx, steps...); err != nil {
		t.Fatalf("browser: %s: %v", what, err)
	}
}

// bget runs one browser action with a bound and returns its value.
func bget[T any](t *testing.T, ctx context.Context, d time.Duration, what string, a chromedp.Action[T]) T {
	t.Helper()
	tctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	v, err := chromedp.Run(tctx, a)
	if err != nil {
		t.Fatalf("browser: %s: %v", what, err)
	}
	return v
}

// poll waits until expression is true in the page.
func poll(expression string) chromedp.Action[chromedp.Void] {
	return chromedp.Poll[chromedp.Void](expression, chromedp.WithPollingInterval(50*time.Millisecond))
}

// screenshot saves the whole page as dir/name.png.
func screenshot(t *testing.T, ctx context.Context, dir, name string) {
	t.Helper()
	png := bget(t, ctx, 20*time.Second, "screenshot "+name, chromedp.FullScreenshot(100))
	if err := os.WriteFile(filepath.Join(dir, name+".png"), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// etcdChange is a change the dashboard shows, as the test's own watches
// saw it: at, the first member to report it; members, when each did.
type etcdChange struct {
	rev     int64
	at      time.Time
	key     string
	members []time.Duration // after at, per etcd member
}

// watchShown records, from a watch of its own on each etcd member, each
// change under the prefix that the dashboard shows (shownChange), until
// the returned stop.
func (s *stack) watchShown(t *testing.T) (stop func() []etcdChange) {
	ctx, cancel := context.WithCancel(t.Context())
	var mu sync.Mutex
	seen := map[int64]*etcdChange{}
	var wg sync.WaitGroup
	for i, m := range s.etcd {
		ch := newTestClient(t, m.clientURL).Watch(ctx, s.prefix+"/", clientv3.WithPrefix())
		wg.Go(func() {
			for resp := range ch {
				now := time.Now()
				var evs []*clientv3.Event
				for _, ev := range resp.Events {
					key := strings.TrimPrefix(string(ev.Kv.Key), s.prefix)
					evs = append(evs, &clientv3.Event{Type: ev.Type, Kv: &mvccpb.KeyValue{Key: []byte(key), ModRevision: ev.Kv.ModRevision}})
				}
				if !shownChange(evs, 0) {
					continue
				}
				mu.Lock()
				c := seen[resp.Header.Revision]
				if c == nil {
					c = &etcdChange{rev: resp.Header.Revision, at: now, key: string(evs[0].Kv.Key), members: make([]time.Duration, len(s.etcd))}
					seen[c.rev] = c
				}
				c.members[i] = now.Sub(c.at)
				mu.Unlock()
			}
		})
	}
	return func() []etcdChange {
		cancel()
		wg.Wait()
		var out []etcdChange
		for _, c := range seen {
			out = append(out, *c)
		}
		slices.SortFunc(out, func(a, b etcdChange) int { return int(a.rev - b.rev) })
		return out
	}
}

// pageRender is one view the page rendered (app.js's window.dashRenders).
type pageRender struct {
	Rev  int64   `json:"rev"`
	T    float64 `json:"t"`    // Date.now() after the render
	Read float64 `json:"read"` // when the node began to read the view (its clock: the same machine)
}

// pageState is the qa row as the page showed it after a change
// (recorded in the page by a MutationObserver the test installs).
type pageState struct {
	T     float64  `json:"t"`
	Cells []string `json:"cells"` // "<state> <short image ID>" per node
}

// dashboardScenario is TestE2E's scenario 14d, on the shared stack: qa is
// the tag's current image ID (updated by the rollback), deploy pushes a
// new version of qaRef and waits for every node.
func dashboardScenario(t *testing.T, s *stack, qaRef string, qa *string, deploy func(*testing.T, string) string) {
	dir := dashArtifacts(t)
	n := s.nodes[0]
	base := fmt.Sprintf("http://127.0.0.1:%d", n.port)
	ctx, requests, pageErrors := browser(t)
	const bound = 30 * time.Second

	// A wrong secret is refused, on the login form.
	brun(t, ctx, bound, "wrong secret",
		chromedp.Navigate(base+"/"),
		chromedp.WaitVisible(chromedp.ID("secret")),
		chromedp.SendKeys(chromedp.ID("secret"), "not-the-secret"),
		chromedp.Click(chromedp.ID("login")),
		chromedp.WaitVisible(chromedp.ID("message")))
	if message := bget(t, ctx, bound, "the login form's message", chromedp.Text(chromedp.ID("message"))); !strings.Contains(message, "Wrong secret") {
		t.Errorf("after a wrong secret the login form says %q; want Wrong secret", message)
	}
	screenshot(t, ctx, dir, "1-login-refused")

	// The right one logs in: the page goes live.
	brun(t, ctx, bound, "log in",
		chromedp.SendKeys(chromedp.ID("secret"), s.secret),
		chromedp.Click(chromedp.ID("login")),
		chromedp.WaitVisible(chromedp.CSS("#conn.live")),
		chromedp.WaitVisible(chromedp.CSS(`#matrix tr[data-image="`+qaRef+`"]`)))

	// The session cookie's flags, and the page's script cannot read it.
	cookies, err := chromedp.Call(ctx, network.GetCookies, network.GetCookiesParams{URLs: []string{base + "/"}})
	if err != nil {
		t.Fatal(err)
	}
	docCookie := bget(t, ctx, bound, "document.cookie", chromedp.Evaluate[string](`document.cookie`))
	var session *network.Cookie
	for _, c := range cookies.Cookies {
		if c.Name == sessionCookieName {
			session = c
		}
	}
	switch {
	case session == nil:
		t.Errorf("no %s cookie after login: %+v", sessionCookieName, cookies.Cookies)
	case !session.HTTPOnly || session.SameSite != network.CookieSameSiteStrict || session.Secure || session.Expires <= 0 || strings.Contains(session.Value, s.secret):
		// Plain HTTP here: Secure is set over HTTPS (TestDashLoginCookie).
		t.Errorf("session cookie HttpOnly %v SameSite %v Secure %v Expires %v; want HttpOnly, Strict, not Secure over HTTP, an expiry, not the secret",
			session.HTTPOnly, session.SameSite, session.Secure, session.Expires)
	case docCookie != "":
		t.Errorf("document.cookie = %q; want the session hidden from scripts", docCookie)
	}

	// A state-changing request without the CSRF token is refused, from the
	// page itself (same origin, with the session cookie).
	post := `fetch('/ui/action/rollback', {method: 'POST', credentials: 'same-origin', headers: %s, body: JSON.stringify({image: %q})}).then(r => r.status)`
	noToken := bget(t, ctx, bound, "post without the CSRF token",
		chromedp.Evaluate[int](fmt.Sprintf(post, `{'Content-Type': 'application/json'}`, qaRef), chromedp.EvalAwaitPromise))
	badToken := bget(t, ctx, bound, "post with a forged CSRF token",
		chromedp.Evaluate[int](fmt.Sprintf(post, `{'Content-Type': 'application/json', 'X-CSRF-Token': 'forged'}`, qaRef), chromedp.EvalAwaitPromise))
	if noToken != 403 || badToken != 403 {
		t.Errorf("rollback posted from the page without the CSRF token: %d, with a forged one: %d; want 403, 403", noToken, badToken)
	}

	// Watch a deploy across the three nodes: the page records the qa row
	// after each change; the test's own etcd watch records each change.
	observe := fmt.Sprintf(`(() => {
		window.qaStates = [];
		const take = () => {
			const row = document.querySelector('#matrix tr[data-image="%s"]');
			if (!row) return;
			const cells = [...row.querySelectorAll('td.cell')].map(td => (td.dataset.state || '') + ' ' + ((td.querySelector('code') || {}).textContent || ''));
			const last = window.qaStates[window.qaStates.length - 1];
			if (!last || last.cells.join('|') !== cells.join('|')) window.qaStates.push({t: Date.now(), cells});
		};
		take();
		new MutationObserver(take).observe(document.getElementById('matrix'), {childList: true, subtree: true});
		return true;
	})()`, qaRef)
	bget(t, ctx, bound, "observe the matrix", chromedp.Evaluate[bool](observe))
	old := *qa
	stopWatch := s.watchShown(t)
	start := time.Now()
	*qa = deploy(t, "scenario 14d (watched on the dashboard)")
	newShort := shortID(*qa)
	brun(t, ctx, bound, "the page shows every node on the new version",
		poll(fmt.Sprintf(`window.qaStates.length > 0 && window.qaStates[window.qaStates.length-1].cells.every(c => c === 'up to date %s')`, newShort)))
	changes := stopWatch()
	states := bget(t, ctx, bound, "the page's states", chromedp.Evaluate[[]pageState](`window.qaStates`))
	renders := bget(t, ctx, bound, "the page's renders", chromedp.Evaluate[[]pageRender](`window.dashRenders`))
	screenshot(t, ctx, dir, "2-after-deploy")

	// The page showed the rollout as it happened: every node from the
	// old version to the new one, not all at once.
	var lines []string
	mixed := false
	for _, st := range states {
		onNew := 0
		for _, c := range st.Cells {
			if strings.HasSuffix(c, newShort) {
				onNew++
			}
		}
		if onNew > 0 && onNew < len(s.nodes) {
			mixed = true
		}
		lines = append(lines, fmt.Sprintf("  %+7.3fs %s", time.UnixMilli(int64(st.T)).Sub(start).Seconds(), strings.Join(st.Cells, " | ")))
	}
	if !mixed || len(states) < 3 || !strings.HasSuffix(states[0].Cells[0], shortID(old)) {
		t.Errorf("the page did not show the rollout progress from %s to %s (want a state with some nodes on each):\n%s", shortID(old), newShort, strings.Join(lines, "\n"))
	}

	// Latency: from the test's watch seeing a change to the page having
	// rendered a view at or after its revision.
	var lat []time.Duration
	var breakdown []string // for the slow ones: etcd → the node's read, the read → the render
	for _, c := range changes {
		for _, r := range renders {
			if r.Rev >= c.rev {
				d := time.UnixMilli(int64(r.T)).Sub(c.at)
				lat = append(lat, d)
				if d > 200*time.Millisecond {
					breakdown = append(breakdown, fmt.Sprintf("%s at revision %d: %v (%v to the node's read, %v from there to the page; the etcd members reported it after %v)",
						c.key, c.rev, d.Round(time.Millisecond), time.UnixMilli(int64(r.Read)).Sub(c.at).Round(time.Millisecond),
						time.UnixMilli(int64(r.T)).Sub(time.UnixMilli(int64(r.Read))), c.members))
				}
				break
			}
		}
	}
	if len(lat) == 0 {
		t.Fatalf("no etcd change matched a page render (%d changes, %d renders)", len(changes), len(renders))
	}
	slices.Sort(lat)
	p50, p90, worst := lat[len(lat)/2], lat[len(lat)*9/10], lat[len(lat)-1]
	if os.Getenv("DASH_TIMELINE") != "" {
		for _, c := range changes {
			t.Logf("change rev %d %s at %+.3fs", c.rev, c.key, c.at.Sub(start).Seconds())
		}
		for _, r := range renders {
			t.Logf("render rev %d read %+.3fs shown %+.3fs", r.Rev, time.UnixMilli(int64(r.Read)).Sub(start).Seconds(), time.UnixMilli(int64(r.T)).Sub(start).Seconds())
		}
	}
	if worst > time.Second {
		t.Errorf("a change in etcd reached the page after %v; want within 1s (median %v); the slow ones:\n%s", worst, p50, strings.Join(breakdown, "\n"))
	}
	s.record("scenario 14d: dashboard: the deploy as the page showed it (seconds after the webhook; node1 | node2 | node3):\n%s", strings.Join(lines, "\n"))
	s.record("scenario 14d: etcd change → page rendered: %d changes, median %v, p90 %v, max %v (the first of the test's watches of each etcd member to report it, to the page's render, same clock)%s",
		len(lat), p50.Round(time.Millisecond), p90.Round(time.Millisecond), worst.Round(time.Millisecond), strings.Join(append([]string{""}, breakdown...), "\n  "))

	// Roll back from the page, behind its confirmation.
	button := fmt.Sprintf(`#matrix tr[data-image="%s"] button[data-action="rollback"]`, qaRef)
	brun(t, ctx, bound, "rollback: the confirmation",
		poll(fmt.Sprintf(`(() => { const h = document.querySelector('#history div[data-image="%s"] tbody tr .badge'); return h && h.textContent === 'rolled out'; })()`, qaRef)),
		chromedp.Click(chromedp.CSS(button)),
		chromedp.WaitVisible(chromedp.ID("confirm")))
	if text := bget(t, ctx, bound, "the confirmation's text", chromedp.Text(chromedp.ID("confirm-text"))); !strings.Contains(text, newShort) {
		t.Errorf("the rollback's confirmation %q does not name the version rolled back (%s)", text, newShort)
	}
	screenshot(t, ctx, dir, "3-rollback-confirmation")
	brun(t, ctx, 60*time.Second, "rollback: confirmed",
		chromedp.Click(chromedp.ID("confirm-ok")),
		poll(`document.getElementById('toast').textContent.includes('done')`))
	// (The note goes after a few seconds: the screenshot below shows the page.)
	toast := bget(t, ctx, bound, "the toast", chromedp.Text(chromedp.ID("toast")))
	out, err := exec.Command(s.bin, "history", "-json", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, qaRef).Output()
	var h historyView
	if err != nil || json.Unmarshal(out, &h) != nil || len(h.Tags) != 1 || len(h.Tags[0].Versions) < 2 {
		t.Fatalf("deployer history after the rollback: %v\n%s", err, out)
	}
	v := h.Tags[0].Versions[0]
	if v.AskedBy.Command != "dashboard rollback" || !strings.HasPrefix(v.AskedBy.Remote, "127.0.0.1:") || v.AskedBy.Node != n.name {
		t.Errorf("the rollback's version asked by %+v; want the dashboard on %s and the browser's address", v.AskedBy, n.name)
	}
	s.waitImage(s.nodes, "app", v.ImageID, 90*time.Second)
	*qa = v.ImageID
	brun(t, ctx, bound, "the page shows the rollback",
		poll(fmt.Sprintf(`window.qaStates[window.qaStates.length-1].cells.every(c => c === 'up to date %s')`, shortID(v.ImageID))),
		poll(fmt.Sprintf(`(() => { const h = document.querySelector('#history div[data-image="%s"] tbody tr .badge'); return h && h.textContent === 'rolled out'; })()`, qaRef)))
	brun(t, ctx, bound, "the note goes", poll(`!document.getElementById('toast').classList.contains('shown')`))
	screenshot(t, ctx, dir, "4-after-rollback")
	s.record("scenario 14d: dashboard rollback: %q; ledger version %d asked by %+v", toast, v.Version, v.AskedBy)

	// Logging out ends the page's session in this browser.
	brun(t, ctx, bound, "log out",
		chromedp.Click(chromedp.ID("logout")),
		chromedp.WaitVisible(chromedp.ID("secret")))

	if errs := pageErrors(); len(errs) > 0 {
		t.Errorf("the page's script failed:\n%s", strings.Join(errs, "\n"))
	}

	// Nothing came from anywhere but the daemon.
	reqs := requests()
	var outside []string
	for _, u := range reqs {
		if !strings.HasPrefix(u, base+"/") {
			outside = append(outside, u)
		}
	}
	if len(outside) > 0 || len(reqs) == 0 {
		t.Errorf("the page loaded from outside the daemon: %v (of %d requests)", outside, len(reqs))
	}
	s.record("scenario 14d: the page made %d requests, all to %s (%s); screenshots in %s", len(reqs), base, strings.Join(distinctPaths(reqs, base), " "), dir)
}

// distinctPaths lists the paths of urls under base, once each.
func distinctPaths(urls []string, base string) []string {
	var out []string
	for _, u := range urls {
		p := strings.TrimPrefix(u, base)
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}
