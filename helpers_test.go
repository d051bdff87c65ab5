package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/die-net/deployer/internal/etcdc"
	"github.com/die-net/deployer/internal/testetcd"
)

// One embedded etcd serves the whole package; each test gets its own key
// prefix from testPrefix.
var (
	sharedEtcdOnce sync.Once
	sharedEtcd     *embed.Etcd
	sharedEtcdURL  string
	sharedEtcdErr  error
	sharedEtcdDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedEtcd != nil {
		sharedEtcd.Close()
		os.RemoveAll(sharedEtcdDir)
	}
	os.Exit(code)
}

// freePort returns a loopback URL with a port that was free a moment ago.
func freePort(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return "http://" + ln.Addr().String()
}

// startTestEtcd starts an embedded etcd in dir on free loopback ports
// (testetcd.Start).
func startTestEtcd(tb testing.TB, dir string) (*embed.Etcd, string) {
	tb.Helper()
	return testetcd.Start(tb, dir)
}

// testEtcd returns a client of the shared embedded etcd, closed at the end
// of the test.
func testEtcd(tb testing.TB) *clientv3.Client {
	tb.Helper()
	sharedEtcdOnce.Do(func() {
		sharedEtcdDir, sharedEtcdErr = os.MkdirTemp("", "deployer-etcd-")
		if sharedEtcdErr != nil {
			return
		}
		sharedEtcd, sharedEtcdURL = startTestEtcd(tb, sharedEtcdDir)
	})
	if sharedEtcdErr != nil {
		tb.Fatal(sharedEtcdErr)
	}
	return newTestClient(tb, sharedEtcdURL)
}

func newTestClient(tb testing.TB, endpoints ...string) *clientv3.Client {
	tb.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop(), DialOptions: etcdc.DialOptions()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cli.Close() })
	return cli
}

// testNS returns a client of the shared embedded etcd confined to the
// test's own prefix (testPrefix), as newDaemon confines its components to
// -etcd_prefix.
func testNS(tb testing.TB) *clientv3.Client {
	tb.Helper()
	return etcdc.InPrefix(testEtcd(tb), testPrefix(tb))
}

// testLeases returns a node's session source on cli, closed at the end of
// the test.
func testLeases(tb testing.TB, cli *clientv3.Client) *etcdc.NodeLease {
	l := etcdc.NewNodeLease(cli, sessionTTL, 5*time.Second)
	tb.Cleanup(func() { _ = l.Close() })
	return l
}

// testPrefix gives each test its own etcd prefix.
func testPrefix(tb testing.TB) string {
	return "/t/" + strings.NewReplacer("/", "-", " ", "-").Replace(tb.Name())
}

func testLogger(tb testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// fakeDocker is a small in-memory Docker: local tags, a "remote" registry
// that pulls copy from, and containers.
type fakeDocker struct {
	mu         sync.Mutex
	local      map[string]string // repo:tag -> image ID (normalised names)
	retags     []string          // "repo:tag=image ID" of each TagImage
	remote     map[string]string // what a pull of repo:tag would fetch
	containers []*fakeContainer
	pulls      []string // repo:tag of each pull
	pullErr    map[string]error
	stopErr    map[string]error // by container name
	stopAll    error            // every stop fails
	listErr    error
	pingErr    error
	pullHook   func(ref string) // called during a pull, outside the lock
	stopped    chan string      // names of stopped containers, if non-nil

	// supervise makes a stop start a replacement from the tag, as a
	// systemd unit would; crash makes that replacement (or a re-created
	// container) exit at once; crashLoop makes it crash under a restart
	// policy instead, as Docker shows it: running and restarting, its
	// RestartCount and StartedAt moving.
	supervise bool
	crash     bool
	crashLoop bool
	rmOnExit  bool // a crashed replacement is removed at once (docker run --rm)
	listeners []chan<- *docker.APIEvents
	created   int
	removed   []string // images removed
	inspects  int      // inspect calls
	stops     []string // names of the containers stopped
	startErr  error    // returned by starts of new containers
	now       func() time.Time

	// crashAt makes the call of that name (see down) and every later one
	// fail as if the deployer had died just before it; revive ends that.
	crashAt string
	dead    bool
	anon    int // anonymous volumes created

	// The status reporter's view: when each ListContainers happened, how
	// many event subscriptions were made, and eventsDown, dockerd
	// unreachable for events: like go-dockerclient, a subscription is
	// accepted and its channel closed once the connection fails.
	listedAt   []time.Time
	subscribes int
	eventsDown bool

	// digests is the manifest digest the registry serves for repo:tag
	// (default: one derived from the image ID); repoDigests, image ID ->
	// repo@digest of every manifest it was pulled by, as Docker keeps it.
	digests     map[string]string
	repoDigests map[string][]string
	imageLists  int                 // ListImages calls
	listFilters map[string][]string // of the last ListImages
	imageReads  int                 // InspectImage calls
	imageErr    error               // returned by InspectImage of a tag

	// health is the health status new replacements report ("": no
	// healthcheck); inspectHook, when set, sees every container an
	// inspect is about to return (f.mu is held) and may fail the inspect
	// instead. daemonGone is dockerd stopped or restarting (stopDaemon,
	// startDaemon): every call fails as go-dockerclient fails then.
	health      string
	inspectHook func(c *docker.Container) error
	daemonGone  bool
	pings       int              // PingWithContext calls
	goneCalls   int              // calls that failed because dockerd was down
	diedWith    []*fakeContainer // the containers the last stopDaemon stopped
	// faults are the answers of the next calls of an operation, as
	// "Op", "Op:name" (the container's name when called) or "Op:ID", one
	// popped per call: dockerd failing a step for a while ("device or resource
	// busy" on a remove, a start that fails once).
	faults map[string][]error
	// createLate: a create whose answer is lost (its deadline passed)
	// although dockerd created the container.
	createLate error
	updates    []string // "name=policy" of each UpdateContainer
}

// fault pops the next injected failure of op on container c (nil: none
// named); f.mu is held.
func (f *fakeDocker) fault(op string, c *fakeContainer) error {
	keys := []string{op}
	if c != nil {
		keys = []string{op + ":" + c.ID, op + ":" + c.Name, op}
	}
	for _, k := range keys {
		if q := f.faults[k]; len(q) > 0 {
			f.faults[k] = q[1:]
			return q[0]
		}
	}
	return nil
}

// failNext makes the next calls of op (see faults) fail with errs.
func (f *fakeDocker) failNext(op string, errs ...error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.faults == nil {
		f.faults = map[string][]error{}
	}
	f.faults[op] = append(f.faults[op], errs...)
}

// Errors as dockerd 20.10 answers them.
var (
	// A forced remove while the container's mounts are still busy.
	errRemoveBusy = &docker.Error{Status: 500, Message: "container 1f2e: driver \"overlay2\" failed to remove root filesystem: unlinkat /var/lib/docker/overlay2/abc/merged: device or resource busy"}
	// A start that the runtime refused for the moment.
	errStartFailed = &docker.Error{Status: 500, Message: "failed to create shim task: context deadline exceeded: unknown"}
)

// restartDaemon is a dockerd restart (without live-restore): stopDaemon,
// then startDaemon.
func (f *fakeDocker) restartDaemon() {
	f.stopDaemon()
	f.startDaemon()
}

// errDockerGone is what go-dockerclient returns while dockerd is down: its
// socket is gone.
var errDockerGone = &url.Error{Op: "Get", URL: "http://unix.sock/_ping", Err: &net.OpError{
	Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.ENOENT),
}}

var errFakeCrashed = errors.New("fake: the deployer crashed before this call")

// down reports the crash injected by crashAt ("Op", or "Op:name" for a
// call naming that name); f.mu is held.
func (f *fakeDocker) down(op string, names ...string) error {
	if f.daemonGone {
		f.goneCalls++
		return errDockerGone
	}
	if op == f.crashAt {
		f.dead = true
	}
	for _, n := range names {
		if op+":"+n == f.crashAt {
			f.dead = true
		}
	}
	if f.dead {
		return errFakeCrashed
	}
	return nil
}

// revive is the deployer starting again after the crash.
func (f *fakeDocker) revive() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dead, f.crashAt = false, ""
}

// containerByName returns the container called name, if any.
func (f *fakeDocker) containerByName(name string) *fakeContainer {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.containers {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// mountsFor returns the mounts Docker would give a new container: binds
// and mounts as given, and a new anonymous volume for every other path in
// Config.Volumes and for a volume mount without a source; f.mu is held.
func (f *fakeDocker) mountsFor(cfg *docker.Config, host *docker.HostConfig) []docker.Mount {
	var out []docker.Mount
	covered := map[string]bool{}
	anon := func() string {
		f.anon++
		return fmt.Sprintf("%064x", f.anon)
	}
	if host != nil {
		for _, b := range host.Binds {
			p := strings.Split(b, ":")
			m := docker.Mount{Source: p[0], Destination: p[1], RW: true}
			if len(p) > 2 {
				m.Mode = p[2]
				m.RW = !slices.Contains(strings.Split(p[2], ","), "ro")
			}
			if !strings.HasPrefix(p[0], "/") {
				m.Name, m.Source, m.Driver = p[0], "/var/lib/docker/volumes/"+p[0]+"/_data", cmp.Or(host.VolumeDriver, "local")
			}
			out = append(out, m)
			covered[m.Destination] = true
		}
		for _, hm := range host.Mounts {
			m := docker.Mount{Source: hm.Source, Destination: hm.Target, RW: !hm.ReadOnly}
			if hm.Type == "volume" {
				m.Name, m.Driver = cmp.Or(hm.Source, anon()), "local"
				if hm.VolumeOptions != nil && hm.VolumeOptions.DriverConfig.Name != "" {
					m.Driver = hm.VolumeOptions.DriverConfig.Name
				}
				m.Source = "/var/lib/docker/volumes/" + m.Name + "/_data"
			}
			out = append(out, m)
			covered[m.Destination] = true
		}
	}
	if cfg != nil {
		for _, dst := range slices.Sorted(maps.Keys(cfg.Volumes)) {
			if !covered[dst] {
				name := anon()
				out = append(out, docker.Mount{Name: name, Source: "/var/lib/docker/volumes/" + name + "/_data", Destination: dst, Driver: "local", RW: true})
			}
		}
	}
	return out
}

type fakeContainer struct {
	ID, Name, ConfigImage, ImageID string
	Running, Exited                bool
	Restarting                     bool
	RestartCount                   int
	StartedAt                      time.Time
	ExitCode                       int       // with FinishedAt: how the last run ended
	FinishedAt                     time.Time // zero: as the fake says (exited or crashing: code 1)
	Health                         string    // health status; "": no healthcheck
	Config                         *docker.Config
	HostConfig                     *docker.HostConfig
	Mounts                         []docker.Mount // nil: the default bind /srv:/data
	manualStop                     bool           // stopped through the API, not started since
	unit                           string         // the name its supervisor runs it as ("" : Name)
	unsupervised                   bool           // no supervisor runs it, whatever f.supervise says (a recreate-strategy container)
}

// unitName is the name c's supervisor (a systemd unit) knows it by, which
// a rename does not change.
func (c *fakeContainer) unitName() string { return cmp.Or(c.unit, c.Name) }

// defaultHost is the host configuration of a container added without
// one.
func defaultHost() *docker.HostConfig {
	return &docker.HostConfig{NetworkMode: "none", RestartPolicy: docker.RestartUnlessStopped(), Binds: []string{"/srv:/data"}}
}

// crashed makes c crash as the fake's mode says; f.mu is held.
func (f *fakeDocker) crashed(c *fakeContainer) {
	switch {
	case f.crashLoop:
		// Docker under a restart policy: caught between two restarts.
		c.Running, c.Restarting, c.RestartCount = true, true, c.RestartCount+3
		c.StartedAt = f.clock().Add(-2 * minUp) // long ago: a bare "has run for 1s" rule passes
	case f.crash:
		c.Running, c.Exited = false, true
	}
	c.ExitCode, c.FinishedAt = 0, time.Time{} // a crash: as the fake says
}

func (f *fakeDocker) clock() time.Time {
	if f.now != nil {
		return f.now()
	}
	return time.Unix(200, 0)
}

// endEvents ends the event stream as go-dockerclient does when dockerd
// goes away: every listener channel is closed and dropped.
func (f *fakeDocker) endEvents() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, l := range f.listeners {
		close(l)
	}
	f.listeners = nil
}

var (
	_ imageAPI     = (*fakeDocker)(nil)
	_ containerAPI = (*fakeDocker)(nil)
	_ dockerAPI    = (*fakeDocker)(nil)
	_ recreateAPI  = (*fakeDocker)(nil)
	_ upAPI        = (*fakeDocker)(nil)
)

func newFakeDocker() *fakeDocker {
	return &fakeDocker{local: map[string]string{}, remote: map[string]string{}, pullErr: map[string]error{}, stopErr: map[string]error{},
		digests: map[string]string{}, repoDigests: map[string][]string{}}
}

func (f *fakeDocker) addContainer(name, configImage string) *fakeContainer {
	f.mu.Lock()
	defer f.mu.Unlock()
	ref, _ := containerRef(configImage, "")
	id := ""
	if ref != nil {
		id = f.local[ref.String()]
	}
	c := &fakeContainer{ID: fmt.Sprintf("%x", sha256.Sum256([]byte(name))), Name: name, ConfigImage: configImage, ImageID: id, Running: true, unit: name}
	f.containers = append(f.containers, c)
	return c
}

// ListImages lists the local images as dockerd 20.10 does: familiar
// names, and with a "reference" filter (matched with
// reference.FamiliarMatch against each tag and digest) only the matching
// tags and digests of the images that have one, and no dangling image.
func (f *fakeDocker) ListImages(opts docker.ListImagesOptions) ([]docker.APIImages, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.imageLists++
	f.listFilters = opts.Filters
	if f.listErr != nil {
		return nil, f.listErr
	}
	patterns := opts.Filters["reference"]
	keep := func(name string) (string, bool) {
		ref, err := reference.ParseNormalizedNamed(name)
		if err != nil {
			return strings.TrimPrefix(name, "docker.io/"), len(patterns) == 0
		}
		if len(patterns) == 0 {
			return reference.FamiliarString(ref), true
		}
		for _, p := range patterns {
			if ok, _ := reference.FamiliarMatch(p, ref); ok {
				return reference.FamiliarString(ref), true
			}
		}
		return "", false
	}
	byID := map[string]*docker.APIImages{}
	get := func(id string) *docker.APIImages {
		if byID[id] == nil {
			byID[id] = &docker.APIImages{ID: id}
		}
		return byID[id]
	}
	for tag, id := range f.local {
		if name, ok := keep(tag); ok {
			get(id).RepoTags = append(get(id).RepoTags, name)
		}
	}
	for id, rds := range f.repoDigests {
		for _, rd := range rds {
			if name, ok := keep(rd); ok {
				get(id).RepoDigests = append(get(id).RepoDigests, name)
			}
		}
	}
	var out []docker.APIImages
	for _, img := range byID {
		out = append(out, *img)
	}
	if len(patterns) == 0 {
		out = append(out, docker.APIImages{ID: "sha256:dangling", RepoTags: []string{"<none>:<none>"}})
	}
	return out, nil
}

// pullInStream says whether dockerd reports a pull's failure inside the
// progress stream, after answering 200 (a rate limit or a missing blob
// met mid-pull), rather than as its HTTP answer (a *docker.Error: the
// manifest unknown, the registry unreachable) or as a failed connection.
func pullInStream(err error) bool {
	var de *docker.Error
	var ue *url.Error
	return !errors.As(err, &de) && !errors.As(err, &ue) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// writePull writes a pull's progress stream as dockerd 20.10 does (one
// JSON message a line, captured from it): "Pulling from", the layers of a
// new image, "Digest: …" and the final status, or an error message that
// ends the stream. Like go-dockerclient, it copies the stream raw to
// OutputStream with RawJSONStream (in small chunks, as a connection gives
// it); otherwise it decodes it: the text goes to OutputStream and an
// error message becomes PullImage's error.
func writePull(opts docker.PullImageOptions, digest string, changed bool, failure error) error {
	ref, err := reference.WithTag(must(reference.ParseNormalizedNamed(opts.Repository)), opts.Tag)
	if err != nil {
		return &docker.Error{Status: 400, Message: err.Error()}
	}
	msgs := []map[string]any{{"status": "Pulling from " + reference.Path(ref), "id": opts.Tag}}
	switch {
	case failure != nil:
		msgs = append(msgs, map[string]any{"errorDetail": map[string]any{"message": failure.Error()}, "error": failure.Error()})
	case changed:
		layer := fmt.Sprintf("%x", sha256.Sum256([]byte(digest)))[:12]
		msgs = append(msgs,
			map[string]any{"status": "Pulling fs layer", "progressDetail": map[string]any{}, "id": layer},
			map[string]any{"status": "Downloading", "progressDetail": map[string]any{"current": 128, "total": 128}, "progress": "[==================================================>]     128B/128B", "id": layer},
			map[string]any{"status": "Pull complete", "progressDetail": map[string]any{}, "id": layer},
		)
		fallthrough
	default:
		status := "Status: Image is up to date for "
		if changed {
			status = "Status: Downloaded newer image for "
		}
		msgs = append(msgs, map[string]any{"status": "Digest: " + digest}, map[string]any{"status": status + reference.FamiliarString(ref)})
	}
	w := opts.OutputStream
	if w == nil {
		w = io.Discard
	}
	for _, m := range msgs {
		if !opts.RawJSONStream {
			if m["error"] != nil {
				return errors.New(failure.Error())
			}
			fmt.Fprintln(w, m["status"])
			continue
		}
		b, _ := json.Marshal(m)
		for b = append(b, "\r\n"...); len(b) > 0; {
			n, _ := w.Write(b[:min(7, len(b))])
			b = b[n:]
		}
	}
	return nil
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// manifestDigest is the digest of the manifest the registry serves for
// ref now; f.mu is held.
func (f *fakeDocker) manifestDigest(ref, id string) string {
	if d := f.digests[ref]; d != "" {
		return d
	}
	return fmt.Sprintf("sha256:%x", sha256.Sum256([]byte(id)))
}

// addRepoDigest records that image id was pulled by repo@digest, as
// Docker does; f.mu is held.
func (f *fakeDocker) addRepoDigest(id, repo, digest string) {
	if id == "" || digest == "" {
		return
	}
	if rd := repo + "@" + digest; !slices.Contains(f.repoDigests[id], rd) {
		f.repoDigests[id] = append(f.repoDigests[id], rd)
	}
}

func (f *fakeDocker) PullImage(opts docker.PullImageOptions, _ docker.AuthConfiguration) error {
	ref := opts.Repository + ":" + opts.Tag
	if f.pullHook != nil {
		f.pullHook(ref)
	}
	f.mu.Lock()
	f.pulls = append(f.pulls, ref)
	if err := f.pullErr[ref]; err != nil {
		f.mu.Unlock()
		if pullInStream(err) {
			return writePull(opts, "", false, err)
		}
		return err
	}
	old := f.local[ref]
	id, ok := f.remote[ref]
	if !ok {
		id = old // the registry serves what we have
	}
	if id != "" {
		f.local[ref] = id
	}
	digest := f.manifestDigest(ref, id)
	f.addRepoDigest(id, opts.Repository, digest)
	f.mu.Unlock()
	return writePull(opts, digest, id != old, nil)
}

func (f *fakeDocker) ListContainers(opts docker.ListContainersOptions) ([]docker.APIContainers, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listedAt = append(f.listedAt, time.Now())
	if f.listErr != nil {
		return nil, f.listErr
	}
	if err := f.down("ListContainers"); err != nil {
		return nil, err
	}
	var out []docker.APIContainers
	for _, c := range f.containers {
		if !c.Running && !opts.All {
			continue
		}
		if anc := opts.Filters["ancestor"]; len(anc) > 0 && !slices.Contains(anc, c.ImageID) {
			continue
		}
		// Like Docker: the reference while it resolves to the
		// container's image, the short image ID once it does not.
		image := c.ConfigImage
		if ref, ok := containerRef(c.ConfigImage, c.ImageID); ok && f.local[ref.String()] != c.ImageID {
			image = shortID(c.ImageID)
		}
		// Like Docker: a crash loop is listed as restarting, the health
		// in the status line.
		state, status := "running", "Up 2 minutes"
		switch {
		case !c.Running:
			state, status = "exited", "Exited (1) 1 second ago"
		case c.Restarting:
			state, status = "restarting", "Restarting (1) 1 second ago"
		case c.Health == "starting":
			status += " (health: starting)"
		case c.Health != "":
			status += " (" + c.Health + ")"
		}
		out = append(out, docker.APIContainers{ID: c.ID, Image: image, Names: []string{"/" + c.Name}, State: state, Status: status})
	}
	return out, nil
}

func (f *fakeDocker) InspectContainerWithContext(id string, _ context.Context) (*docker.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inspects++
	if err := f.down("InspectContainer"); err != nil {
		return nil, err
	}
	for _, c := range f.containers {
		if c.ID == id || c.Name == id {
			cfg := c.Config
			if cfg == nil {
				cfg = &docker.Config{Image: c.ConfigImage, Env: []string{"PATH=/bin", "APP=1"}, Cmd: []string{"/app"}, Labels: map[string]string{"team": "x"}}
			}
			started := c.StartedAt
			if started.IsZero() {
				started = time.Unix(100, 0)
			}
			st := docker.State{Running: c.Running, Restarting: c.Restarting, StartedAt: started}
			if c.Exited || c.Restarting {
				st.FinishedAt, st.ExitCode = started.Add(10*time.Millisecond), 1
			}
			if !c.FinishedAt.IsZero() {
				st.FinishedAt, st.ExitCode = c.FinishedAt, c.ExitCode
			}
			st.Health.Status = c.Health
			host := c.HostConfig
			if host == nil {
				host = defaultHost()
			}
			mounts := c.Mounts
			if mounts == nil {
				mounts = []docker.Mount{{Source: "/srv", Destination: "/data", RW: true}}
			}
			out := &docker.Container{
				ID: c.ID, Name: "/" + c.Name, Image: c.ImageID, Config: cfg, State: st, RestartCount: c.RestartCount,
				HostConfig: host, Mounts: mounts,
			}
			if f.inspectHook != nil {
				if err := f.inspectHook(out); err != nil {
					return nil, err
				}
			}
			return out, nil
		}
	}
	return nil, &docker.NoSuchContainer{ID: id}
}

func (f *fakeDocker) StopContainerWithContext(id string, _ uint, _ context.Context) error {
	f.mu.Lock()
	if err := f.down("StopContainer"); err != nil {
		f.mu.Unlock()
		return err
	}
	var stopped *fakeContainer
	for _, c := range f.containers {
		if c.ID == id {
			if err := cmp.Or(f.stopErr[c.unitName()], f.stopAll); err != nil {
				f.mu.Unlock()
				return err
			}
			if !c.Running {
				f.mu.Unlock()
				return &docker.ContainerNotRunning{ID: id}
			}
			c.Running, c.manualStop = false, true
			stopped = c
			f.stops = append(f.stops, c.unitName())
		}
	}
	if stopped != nil && stopped.HostConfig != nil && stopped.HostConfig.AutoRemove {
		// --rm: Docker deletes the container once it stops.
		f.containers = slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c == stopped })
	}
	if stopped != nil && f.supervise && !stopped.unsupervised {
		// The unit removes the old container and runs the tag again.
		f.containers = slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c == stopped })
		f.created++
		ref, _ := containerRef(stopped.ConfigImage, "")
		n := &fakeContainer{ID: fmt.Sprintf("%x", sha256.Sum256([]byte(fmt.Sprint(stopped.unitName(), f.created)))), Name: stopped.unitName(),
			ConfigImage: stopped.ConfigImage, ImageID: f.local[ref.String()], Running: true, unit: stopped.unitName(), Health: f.health}
		f.containers = append(f.containers, n)
		f.emit("start", n)
		if f.crash || f.crashLoop {
			f.crashed(n)
			f.emit("die", n)
			if f.rmOnExit { // the unit's `docker run --rm`: gone at once
				f.containers = slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c == n })
			}
		}
	}
	f.mu.Unlock()
	if stopped == nil {
		return &docker.NoSuchContainer{ID: id}
	}
	if f.stopped != nil {
		f.stopped <- stopped.unitName()
	}
	return nil
}

// emit sends an event to the listeners; f.mu is held.
func (f *fakeDocker) emit(action string, c *fakeContainer) {
	code := "1"
	if !c.FinishedAt.IsZero() {
		code = strconv.Itoa(c.ExitCode)
	}
	ev := &docker.APIEvents{Action: action, Type: "container", Actor: docker.APIActor{ID: c.ID, Attributes: map[string]string{"name": c.Name, "exitCode": code}}}
	for _, l := range f.listeners {
		select {
		case l <- ev:
		default:
		}
	}
}

func (f *fakeDocker) AddEventListenerWithOptions(_ docker.EventsOptions, l chan<- *docker.APIEvents) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.subscribes++
	if f.eventsDown || f.daemonGone {
		close(l)
		return nil
	}
	f.listeners = append(f.listeners, l)
	return nil
}

func (f *fakeDocker) RemoveEventListener(l chan *docker.APIEvents) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listeners = slices.DeleteFunc(f.listeners, func(x chan<- *docker.APIEvents) bool { return x == l })
	return nil
}

// InspectImageWithContext reads an image by ID, or by a reference to a
// local tag (docker.ErrNoSuchImage when there is none), with its tags and
// digests.
func (f *fakeDocker) InspectImageWithContext(ctx context.Context, name string) (*docker.Image, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.imageReads++
	id := name
	if !hexID.MatchString(name) && !strings.HasPrefix(name, "sha256:") {
		ref, err := reference.ParseNormalizedNamed(name)
		if err != nil {
			return nil, &docker.Error{Status: 400, Message: err.Error()}
		}
		if f.imageErr != nil {
			return nil, f.imageErr
		}
		if id = f.local[reference.TagNameOnly(ref).String()]; id == "" {
			return nil, docker.ErrNoSuchImage
		}
	}
	img := &docker.Image{ID: id, Config: &docker.Config{Env: []string{"PATH=/bin"}, Cmd: []string{"/app"}}}
	for tag, tid := range f.local {
		if ref, err := reference.ParseNormalizedNamed(tag); err == nil && tid == id {
			img.RepoTags = append(img.RepoTags, reference.FamiliarString(ref))
		}
	}
	for _, rd := range f.repoDigests[id] {
		if ref, err := reference.ParseNormalizedNamed(rd); err == nil {
			img.RepoDigests = append(img.RepoDigests, reference.FamiliarString(ref))
		}
	}
	return img, nil
}

func (f *fakeDocker) CreateContainer(opts docker.CreateContainerOptions) (*docker.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.down("CreateContainer"); err != nil {
		return nil, err
	}
	if err := f.fault("CreateContainer", nil); err != nil {
		return nil, err
	}
	for _, c := range f.containers {
		if c.Name == opts.Name {
			return nil, &docker.Error{Status: 409, Message: "name in use"}
		}
	}
	f.created++
	c := &fakeContainer{ID: fmt.Sprintf("%x", sha256.Sum256([]byte(fmt.Sprint(opts.Name, "created", f.created)))), Name: opts.Name,
		ConfigImage: opts.Config.Image, Config: opts.Config, HostConfig: opts.HostConfig, Mounts: f.mountsFor(opts.Config, opts.HostConfig),
		Health: f.health}
	f.containers = append(f.containers, c)
	if f.createLate != nil {
		return nil, f.createLate
	}
	return &docker.Container{ID: c.ID}, nil
}

func (f *fakeDocker) StartContainerWithContext(id string, _ *docker.HostConfig, _ context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.down("StartContainer"); err != nil {
		return err
	}
	for _, c := range f.containers {
		if c.ID == id {
			if c.Running {
				return &docker.ContainerAlreadyRunning{ID: id}
			}
			if err := f.fault("StartContainer", c); err != nil {
				return err
			}
			c.manualStop = false
			ref, _ := containerRef(c.ConfigImage, "")
			if c.ImageID == "" && ref != nil {
				c.ImageID = f.local[ref.String()]
			}
			if c.Config != nil && f.startErr != nil { // only new containers fail
				return f.startErr
			}
			c.Running, c.Exited = true, false
			if c.Config != nil { // only new containers crash
				f.crashed(c)
			}
			return nil
		}
	}
	return &docker.NoSuchContainer{ID: id}
}

func (f *fakeDocker) RenameContainer(opts docker.RenameContainerOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.down("RenameContainer", opts.Name); err != nil {
		return err
	}
	var late error // renamed, but the answer is lost
	if i := slices.IndexFunc(f.containers, func(c *fakeContainer) bool { return c.ID == opts.ID }); i >= 0 {
		err := f.fault("RenameContainer", f.containers[i])
		var l lateAnswer
		if errors.As(err, &l) {
			late = l.err
		} else if err != nil {
			return err
		}
	}
	for _, c := range f.containers {
		if c.Name == opts.Name && c.ID == opts.ID {
			// dockerd 20.10 refuses a rename to the current name.
			return &docker.Error{Status: 400, Message: "Error when allocating new name: Renaming a container with the same name as its current name"}
		}
		if c.Name == opts.Name && c.ID != opts.ID {
			return &docker.Error{Status: 409, Message: "name in use"}
		}
	}
	for _, c := range f.containers {
		if c.ID == opts.ID {
			c.Name = opts.Name
			return late
		}
	}
	return &docker.NoSuchContainer{ID: opts.ID}
}

// lateAnswer, as an injected fault, is a call that dockerd carries out
// but whose answer the client never gets: it sees err (its deadline).
type lateAnswer struct{ err error }

func (l lateAnswer) Error() string { return l.err.Error() }

func (f *fakeDocker) RemoveContainer(opts docker.RemoveContainerOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.down("RemoveContainer"); err != nil {
		return err
	}
	i := slices.IndexFunc(f.containers, func(c *fakeContainer) bool { return c.ID == opts.ID })
	if i < 0 {
		return &docker.NoSuchContainer{ID: opts.ID}
	}
	c := f.containers[i]
	if err := f.fault("RemoveContainer", c); err != nil {
		return err
	}
	if c.Running && !opts.Force {
		// As dockerd 20.10 answers it.
		return &docker.Error{Status: 409, Message: "You cannot remove a running container " + c.ID + ". Stop the container before attempting removal or force remove"}
	}
	f.containers = slices.Delete(f.containers, i, i+1)
	return nil
}

func (f *fakeDocker) PingWithContext(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pings++
	if f.daemonGone {
		f.goneCalls++
		return errDockerGone
	}
	return f.pingErr
}

// stopDaemon stops dockerd as a restart does: its socket goes first (every
// call fails), then every running container is stopped, the app exiting
// on SIGTERM with code 0, with its kill and die events on the event stream
// still open, and one run with --rm (or, with rmOnExit, a supervisor's
// `docker run --rm`) is removed; then dockerd exits, which ends the event
// stream.
func (f *fakeDocker) stopDaemon() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.daemonGone, f.diedWith = true, nil
	for _, c := range slices.Clone(f.containers) {
		if !c.Running {
			continue
		}
		c.Running, c.Restarting, c.Exited = false, false, true
		c.ExitCode, c.FinishedAt = 0, f.clock()
		f.diedWith = append(f.diedWith, c)
		f.emit("kill", c)
		f.emit("die", c)
		if (c.HostConfig != nil && c.HostConfig.AutoRemove) || f.rmOnExit {
			f.containers = slices.DeleteFunc(f.containers, func(x *fakeContainer) bool { return x == c })
			f.emit("destroy", c)
		}
	}
	for _, l := range f.listeners {
		close(l)
	}
	f.listeners = nil
}

// startDaemon starts dockerd again: calls succeed again; a container whose
// restart policy is always, or unless-stopped and the daemon stopped it,
// runs again (RestartCount 0, as Docker shows it after a daemon restart);
// with supervise, the supervisor runs every other container the daemon
// stopped again from its tag, as a new container (which crashes if crash
// says so).
func (f *fakeDocker) startDaemon() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.daemonGone = false
	restarted := map[string]bool{}
	for _, c := range f.containers {
		if c.Running || c.HostConfig == nil { // a supervisor's container: docker run, no policy
			continue
		}
		switch p := c.HostConfig.RestartPolicy.Name; {
		case p == "always", p == "unless-stopped" && slices.Contains(f.diedWith, c):
			c.Running, c.Exited, c.RestartCount, c.StartedAt, c.Health = true, false, 0, f.clock(), f.health
			restarted[c.Name] = true
			f.emit("start", c)
		}
	}
	if !f.supervise {
		return
	}
	for _, old := range f.diedWith {
		unit := old.unitName()
		if restarted[old.Name] {
			continue
		}
		f.containers = slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c.Name == unit }) // docker rm -f
		f.created++
		ref, _ := containerRef(old.ConfigImage, "")
		n := &fakeContainer{ID: fmt.Sprintf("%x", sha256.Sum256([]byte(fmt.Sprint(unit, f.created)))), Name: unit,
			ConfigImage: old.ConfigImage, ImageID: f.local[ref.String()], Running: true, unit: unit, Health: f.health}
		f.containers = append(f.containers, n)
		f.emit("start", n)
		if f.crash || f.crashLoop {
			f.crashed(n)
			f.emit("die", n)
		}
	}
}

// UpdateContainer changes a container's restart policy, as dockerd does
// for a non-empty policy name (resources are not modelled).
func (f *fakeDocker) UpdateContainer(id string, opts docker.UpdateContainerOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.down("UpdateContainer"); err != nil {
		return err
	}
	for _, c := range f.containers {
		if c.ID != id {
			continue
		}
		if err := f.fault("UpdateContainer", c); err != nil {
			return err
		}
		if opts.RestartPolicy.Name == "" {
			return nil
		}
		if c.HostConfig == nil {
			c.HostConfig = defaultHost()
		}
		if c.HostConfig.AutoRemove && opts.RestartPolicy.Name != "no" {
			return &docker.Error{Status: 409, Message: "Restart policy cannot be updated because AutoRemove is enabled for the container"}
		}
		c.HostConfig.RestartPolicy = opts.RestartPolicy
		f.updates = append(f.updates, c.Name+"="+opts.RestartPolicy.Name)
		return nil
	}
	return &docker.NoSuchContainer{ID: id}
}

func (f *fakeDocker) RemoveImageExtended(id string, _ docker.RemoveImageOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.containers {
		if c.ImageID == id {
			return &docker.Error{Status: 409, Message: "image is being used by container " + c.ID}
		}
	}
	// Like Docker, an image removed by ID loses its one remaining tag
	// with it; with several tags it must be forced.
	var tags []string
	for ref, tid := range f.local {
		if tid == id {
			tags = append(tags, ref)
		}
	}
	if len(tags) > 1 {
		return &docker.Error{Status: 409, Message: "image is referenced in multiple repositories"}
	}
	for _, ref := range tags {
		delete(f.local, ref)
	}
	delete(f.repoDigests, id)
	f.removed = append(f.removed, id)
	return nil
}

// TagImage points a local tag at an image, by ID or by a local tag's
// reference, as docker tag does (with Force).
func (f *fakeDocker) TagImage(name string, opts docker.TagImageOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := name
	if r, err := reference.ParseNormalizedNamed(name); err == nil && !strings.HasPrefix(name, "sha256:") {
		if local := f.local[reference.TagNameOnly(r).String()]; local != "" {
			id = local
		}
	}
	named, err := reference.ParseNormalizedNamed(opts.Repo + ":" + opts.Tag)
	if err != nil {
		return &docker.Error{Status: 400, Message: err.Error()}
	}
	f.local[named.String()] = id
	f.retags = append(f.retags, named.String()+"="+id)
	return nil
}

// newTestReplacer builds the replacement machinery on f with
// newReplacement, as newDaemon does, with short timeouts; cli (confined
// to the test's prefix, see testNS) may be nil when maxUnavailable is 0.
func newTestReplacer(t *testing.T, cli *clientv3.Client, f *fakeDocker, node string, maxUnavailable int) *replacer {
	t.Helper()
	rep := newReplacement(f, f, cli, testLeases(t, cli), replacementOptions{
		node: node, strategy: strategyStop, maxUnavailable: maxUnavailable,
		restartTimeout: 5 * time.Second, killTimeout: time.Second, slotTimeout: time.Minute, callTimeout: 5 * time.Second,
	}, testLogger(t), newMetrics())
	rep.recreator.wait.poll = 10 * time.Millisecond
	rep.recreator.wait.now = f.clock
	rep.parker.retryBase = time.Millisecond
	rep.rollout.releaseBase = time.Millisecond
	return rep.replacer
}

// recoverAtStart runs r's parker as the daemon does, until the test ends,
// and returns once its recovery at start is over.
func recoverAtStart(t *testing.T, r *recreator) {
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { _ = r.parked.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	<-r.parked.recovered
}

// registryDocker is a fakeDocker whose registry misbehaves the way real
// ones do: a pull can fail (the daemon answers 500 naming the registry's
// 503, a rate limit, a timeout) and then succeed once the registry is
// back; a registry or CDN can keep serving the previous manifest for a few
// pulls after a push. Every pull that succeeds adds repo@digest of the
// manifest it got to the image's RepoDigests, as Docker does.
type registryDocker struct {
	*fakeDocker
	rmu         sync.Mutex
	failures    map[string][]error  // repo:tag -> answers of its next pulls (nil: success)
	stale       map[string]int      // repo:tag -> pulls that still get the previous manifest
	digest      map[string]string   // repo:tag -> digest of the manifest the registry serves now (the fake's digests)
	oldDigest   map[string]string   // repo:tag -> digest of the previous manifest
	repoDigests map[string][]string // image ID -> repo@digest (the fake's repoDigests; set before the deploys)
}

func newRegistryDocker(f *fakeDocker) *registryDocker {
	return &registryDocker{fakeDocker: f, failures: map[string][]error{}, stale: map[string]int{}, digest: f.digests,
		oldDigest: map[string]string{}, repoDigests: f.repoDigests}
}

func (r *registryDocker) PullImage(opts docker.PullImageOptions, auth docker.AuthConfiguration) error {
	ref := opts.Repository + ":" + opts.Tag
	r.rmu.Lock()
	var err error
	if q := r.failures[ref]; len(q) > 0 {
		err, r.failures[ref] = q[0], q[1:]
	}
	stale := r.stale[ref] > 0
	if err == nil && stale {
		r.stale[ref]--
	}
	old := r.oldDigest[ref]
	r.rmu.Unlock()
	if err == nil && !stale {
		return r.fakeDocker.PullImage(opts, auth)
	}
	r.mu.Lock()
	r.pulls = append(r.pulls, ref)
	if err == nil {
		old = cmp.Or(old, r.manifestDigest(ref, r.local[ref]))
		r.addRepoDigest(r.local[ref], opts.Repository, old)
	}
	r.mu.Unlock()
	switch {
	case err != nil && !pullInStream(err):
		return err
	case err != nil:
		return writePull(opts, "", false, err)
	}
	return writePull(opts, old, false, nil) // the previous manifest: what we have
}

func (r *registryDocker) pullCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pulls)
}

// Errors as go-dockerclient returns them for a registry's failures.
var (
	// The daemon answers 500 when the registry answered 503.
	errRegistry503 = &docker.Error{Status: 500, Message: `received unexpected HTTP status: 503 Service Unavailable`}
	// A rate limit, in the pull's progress stream, with the registry's Retry-After.
	errRegistry429 = errors.New(`toomanyrequests: too many requests to the registry (Retry-After: 7)`)
	// The pull's deadline passed while the daemon waited for the registry.
	errPullTimeout = &url.Error{Op: "Post", URL: "unix:///var/run/docker.sock/images/create", Err: context.DeadlineExceeded}
	// The registry is down: connection refused, as the daemon reports it.
	errRegistryDown = &docker.Error{Status: 500, Message: `Get "http://127.0.0.1:5000/v2/": dial tcp 127.0.0.1:5000: connect: connection refused`}
	// The tag is not in the registry.
	errManifestUnknown = &docker.Error{Status: 404, Message: `manifest for 127.0.0.1:5000/app:qa not found: manifest unknown: manifest unknown`}
)

// canon parses a canonical repository name, as daemon.submit resolves it.
func canon(name string) reference.Named { return must(reference.ParseNamed(name)) }

// testName is a repository named as a trigger names it, unresolved: the
// queue's and the watcher's tests name repositories freely.
type testName string

func (n testName) Name() string   { return string(n) }
func (n testName) String() string { return string(n) }

// testTagged parses a canonical repo:tag.
func testTagged(ref string) reference.NamedTagged {
	return must(reference.ParseNamed(ref)).(reference.NamedTagged)
}

// testRepo is a repository as daemon.submit resolves it.
func testRepo(t *testing.T, name string) reference.Named {
	t.Helper()
	repo, err := reference.ParseNamed(name)
	if err != nil {
		t.Fatal(err)
	}
	return repo
}

// pollEvery is how often eventually looks.
const pollEvery = 10 * time.Millisecond

// eventually waits until cond holds, looking every pollEvery, and fails the
// test naming what when d passes first.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if _, ok := pollUntil(d, pollEvery, cond); !ok {
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
}

// pollUntil is the one poll loop of the tests: it calls cond every every
// until it holds or d passes, and returns how long that took and whether
// it held. It fails nothing: eventually does, and callers that say more
// than eventually's message (the state they saw) fail by themselves.
func pollUntil(d, every time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			return time.Since(start), false
		}
		time.Sleep(every) // polling: the condition has no event to wait on
	}
	return time.Since(start), true
}
