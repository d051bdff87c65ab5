package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
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

// startTestEtcd starts an embedded etcd in dir on free loopback ports.
func startTestEtcd(tb testing.TB, dir string) (*embed.Etcd, string) {
	tb.Helper()
	cfg := embed.NewConfig()
	cfg.Name = "test"
	cfg.Dir = dir
	cu, _ := url.Parse(freePort(tb))
	pu, _ := url.Parse(freePort(tb))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		tb.Fatalf("start etcd: %v", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		tb.Fatal("etcd not ready in 30s")
	}
	return e, cu.String()
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
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop(), DialOptions: etcdDialOptions()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cli.Close() })
	return cli
}

// testPrefix gives each test its own etcd prefix.
func testPrefix(tb testing.TB) string {
	return "/t/" + strings.NewReplacer("/", "-", " ", "-").Replace(tb.Name())
}

func testLogger(tb testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// fakeDocker is a small in-memory Docker: local tags, a "remote" registry
// that pulls copy from, and containers.
type fakeDocker struct {
	mu         sync.Mutex
	local      map[string]string // repo:tag -> image ID (normalised names)
	remote     map[string]string // what a pull of repo:tag would fetch
	containers []*fakeContainer
	pulls      []string // repo:tag of each pull
	pullErr    map[string]error
	stopErr    map[string]error
	listErr    error
	pingErr    error
	pullHook   func(ref string) // called during a pull, outside the lock
	stopped    chan string      // names of stopped containers, if non-nil

	// supervise makes a stop start a replacement from the tag, as a
	// systemd unit would; crash makes that replacement exit at once.
	supervise bool
	crash     bool
	listeners []chan<- *docker.APIEvents
	created   int
	removed   []string // images removed
}

type fakeContainer struct {
	ID, Name, ConfigImage, ImageID string
	Running, Exited                bool
	Config                         *docker.Config
	HostConfig                     *docker.HostConfig
}

var (
	_ imageAPI     = (*fakeDocker)(nil)
	_ containerAPI = (*fakeDocker)(nil)
	_ dockerAPI    = (*fakeDocker)(nil)
)

func newFakeDocker() *fakeDocker {
	return &fakeDocker{local: map[string]string{}, remote: map[string]string{}, pullErr: map[string]error{}, stopErr: map[string]error{}}
}

func (f *fakeDocker) addContainer(name, configImage string) *fakeContainer {
	f.mu.Lock()
	defer f.mu.Unlock()
	ref, _ := containerRef(configImage, "")
	id := ""
	if ref != nil {
		id = f.local[ref.String()]
	}
	c := &fakeContainer{ID: fmt.Sprintf("%x", sha256.Sum256([]byte(name))), Name: name, ConfigImage: configImage, ImageID: id, Running: true}
	f.containers = append(f.containers, c)
	return c
}

func (f *fakeDocker) ListImages(opts docker.ListImagesOptions) ([]docker.APIImages, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.listErr != nil {
		return nil, f.listErr
	}
	byID := map[string][]string{}
	for tag, id := range f.local {
		byID[id] = append(byID[id], strings.TrimPrefix(tag, "docker.io/"))
	}
	var out []docker.APIImages
	for id, tags := range byID {
		out = append(out, docker.APIImages{ID: id, RepoTags: tags})
	}
	out = append(out, docker.APIImages{ID: "sha256:dangling", RepoTags: []string{"<none>:<none>"}})
	return out, nil
}

func (f *fakeDocker) PullImage(opts docker.PullImageOptions, _ docker.AuthConfiguration) error {
	ref := opts.Repository + ":" + opts.Tag
	if f.pullHook != nil {
		f.pullHook(ref)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pulls = append(f.pulls, ref)
	if err := f.pullErr[ref]; err != nil {
		return err
	}
	if id, ok := f.remote[ref]; ok {
		f.local[ref] = id
	}
	return nil
}

func (f *fakeDocker) ListContainers(opts docker.ListContainersOptions) ([]docker.APIContainers, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.listErr != nil {
		return nil, f.listErr
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
		state := "running"
		if !c.Running {
			state = "exited"
		}
		out = append(out, docker.APIContainers{ID: c.ID, Image: image, Names: []string{"/" + c.Name}, State: state})
	}
	return out, nil
}

func (f *fakeDocker) InspectContainerWithContext(id string, _ context.Context) (*docker.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.containers {
		if c.ID == id || c.Name == id {
			cfg := c.Config
			if cfg == nil {
				cfg = &docker.Config{Image: c.ConfigImage, Env: []string{"PATH=/bin", "APP=1"}, Cmd: []string{"/app"}, Labels: map[string]string{"team": "x"}}
			}
			st := docker.State{Running: c.Running, StartedAt: time.Unix(100, 0)}
			if c.Exited {
				st.FinishedAt, st.ExitCode = time.Unix(101, 0), 1
			}
			return &docker.Container{
				ID: c.ID, Name: "/" + c.Name, Image: c.ImageID, Config: cfg, State: st,
				HostConfig: &docker.HostConfig{NetworkMode: "none", RestartPolicy: docker.RestartUnlessStopped(), Binds: []string{"/srv:/data"}},
			}, nil
		}
	}
	return nil, &docker.NoSuchContainer{ID: id}
}

func (f *fakeDocker) StopContainerWithContext(id string, _ uint, _ context.Context) error {
	f.mu.Lock()
	var stopped *fakeContainer
	for _, c := range f.containers {
		if c.ID == id {
			if err := f.stopErr[c.Name]; err != nil {
				f.mu.Unlock()
				return err
			}
			if !c.Running {
				f.mu.Unlock()
				return &docker.ContainerNotRunning{ID: id}
			}
			c.Running = false
			stopped = c
		}
	}
	if stopped != nil && f.supervise {
		// The unit removes the old container and runs the tag again.
		f.containers = slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c == stopped })
		f.created++
		ref, _ := containerRef(stopped.ConfigImage, "")
		n := &fakeContainer{ID: fmt.Sprintf("%x", sha256.Sum256([]byte(fmt.Sprint(stopped.Name, f.created)))), Name: stopped.Name,
			ConfigImage: stopped.ConfigImage, ImageID: f.local[ref.String()], Running: !f.crash, Exited: f.crash}
		f.containers = append(f.containers, n)
		f.emit("start", n)
		if f.crash {
			f.emit("die", n)
		}
	}
	f.mu.Unlock()
	if stopped == nil {
		return &docker.NoSuchContainer{ID: id}
	}
	if f.stopped != nil {
		f.stopped <- stopped.Name
	}
	return nil
}

// emit sends an event to the listeners; f.mu is held.
func (f *fakeDocker) emit(action string, c *fakeContainer) {
	ev := &docker.APIEvents{Action: action, Type: "container", Actor: docker.APIActor{ID: c.ID, Attributes: map[string]string{"name": c.Name, "exitCode": "1"}}}
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
	f.listeners = append(f.listeners, l)
	return nil
}

func (f *fakeDocker) RemoveEventListener(l chan *docker.APIEvents) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listeners = slices.DeleteFunc(f.listeners, func(x chan<- *docker.APIEvents) bool { return x == l })
	return nil
}

func (f *fakeDocker) InspectImage(name string) (*docker.Image, error) {
	return &docker.Image{ID: name, Config: &docker.Config{Env: []string{"PATH=/bin"}, Cmd: []string{"/app"}}}, nil
}

func (f *fakeDocker) CreateContainer(opts docker.CreateContainerOptions) (*docker.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.containers {
		if c.Name == opts.Name {
			return nil, &docker.Error{Status: 409, Message: "name in use"}
		}
	}
	f.created++
	c := &fakeContainer{ID: fmt.Sprintf("%x", sha256.Sum256([]byte(fmt.Sprint(opts.Name, "created", f.created)))), Name: opts.Name,
		ConfigImage: opts.Config.Image, Config: opts.Config, HostConfig: opts.HostConfig}
	f.containers = append(f.containers, c)
	return &docker.Container{ID: c.ID}, nil
}

func (f *fakeDocker) StartContainerWithContext(id string, _ *docker.HostConfig, _ context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.containers {
		if c.ID == id {
			if c.Running {
				return &docker.ContainerAlreadyRunning{ID: id}
			}
			ref, _ := containerRef(c.ConfigImage, "")
			if c.ImageID == "" && ref != nil {
				c.ImageID = f.local[ref.String()]
			}
			crash := f.crash && c.Config != nil // only new containers crash
			c.Running, c.Exited = !crash, crash
			return nil
		}
	}
	return &docker.NoSuchContainer{ID: id}
}

func (f *fakeDocker) RenameContainer(opts docker.RenameContainerOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.containers {
		if c.ID == opts.ID {
			c.Name = opts.Name
			return nil
		}
	}
	return &docker.NoSuchContainer{ID: opts.ID}
}

func (f *fakeDocker) RemoveContainer(opts docker.RemoveContainerOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := len(f.containers)
	f.containers = slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c.ID == opts.ID && (opts.Force || !c.Running) })
	if len(f.containers) == n {
		return &docker.NoSuchContainer{ID: opts.ID}
	}
	return nil
}

func (f *fakeDocker) PingWithContext(context.Context) error { return f.pingErr }

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
	f.removed = append(f.removed, id)
	return nil
}
