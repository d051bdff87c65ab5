package etcdc

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// fakeLeases is etcd's lease API: refreshes succeed until fail says
// otherwise.
type fakeLeases struct {
	mu       sync.Mutex
	fail     error // returned by KeepAliveOnce while set
	refresh  int
	revoked  []clientv3.LeaseID
	lastCall time.Time
}

func (f *fakeLeases) KeepAliveOnce(_ context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refresh++
	f.lastCall = time.Now()
	if f.fail != nil {
		return nil, f.fail
	}
	return &clientv3.LeaseKeepAliveResponse{ID: id, TTL: 10}, nil
}

func (f *fakeLeases) Revoke(_ context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.revoked = append(f.revoked, id)
	return &clientv3.LeaseRevokeResponse{}, nil
}

func (f *fakeLeases) set(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

func (f *fakeLeases) refreshes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refresh
}

func lost(s *Session) bool {
	select {
	case <-s.Done():
		return true
	default:
		return false
	}
}

// TestSessionRefreshesOnItsOwnTimer: an idle session wakes once every
// third of its TTL, no more, and keeps its lease.
func TestSessionRefreshesOnItsOwnTimer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeLeases{}
		s := NewSession(t.Context(), f, 7, 10).Start()
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if lost(s) {
			t.Fatal("session lost while every refresh succeeded")
		}
		// 600 s / (10 s / 3) = 180 refreshes.
		if n := f.refreshes(); n < 175 || n > 181 {
			t.Errorf("%d refreshes in 10 minutes with a 10s TTL; want about 180", n)
		}
		if err := s.Close(); err != nil || len(f.revoked) != 1 || f.revoked[0] != 7 {
			t.Errorf("Close = %v, revoked %v; want lease 7 revoked", err, f.revoked)
		}
		n := f.refreshes()
		time.Sleep(time.Minute)
		if f.refreshes() != n {
			t.Error("refreshes went on after Close")
		}
	})
}

// TestSessionLost: the session is lost when etcd says the lease is gone
// (at the next refresh), or when no refresh succeeded for a whole TTL; a
// shorter outage is survived.
func TestSessionLost(t *testing.T) {
	for _, tt := range []struct {
		name     string
		err      error
		outage   time.Duration
		wantLost bool
		within   time.Duration
	}{
		{"lease revoked or expired", rpctypes.ErrLeaseNotFound, time.Hour, true, 4 * time.Second},
		{"etcd unreachable for a whole TTL", context.DeadlineExceeded, time.Hour, true, 11 * time.Second},
		{"etcd unreachable for less than a TTL", errors.New("connection refused"), 5 * time.Second, false, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := &fakeLeases{}
				s := NewSession(t.Context(), f, 7, 10).Start()
				time.Sleep(time.Minute) // healthy for a while
				start := time.Now()
				f.set(tt.err)
				if !tt.wantLost {
					time.Sleep(tt.outage)
					f.set(nil)
					time.Sleep(time.Minute)
					if lost(s) {
						t.Fatalf("session lost after a %v outage (TTL 10s)", tt.outage)
					}
					return
				}
				select {
				case <-s.Done():
				case <-time.After(time.Hour): // virtual time: a failure bound
					t.Fatal("session never lost")
				}
				if took := time.Since(start); took > tt.within {
					t.Errorf("lost %v after the fault; want within %v", took, tt.within)
				}
			})
		})
	}
}

// TestSessionOnEtcd: on a real etcd, the lease outlives several TTLs, and
// a revoke is noticed.
func TestSessionOnEtcd(t *testing.T) {
	t.Parallel()
	cli := testEtcd(t)
	lease, err := cli.Grant(t.Context(), 2)
	if err != nil {
		t.Fatal(err)
	}
	s := NewSession(t.Context(), cli, lease.ID, 2).Start()
	defer s.Orphan()
	deadline := time.Now().Add(3 * time.Second) // one and a half TTLs
	for time.Now().Before(deadline) {
		ttl, err := cli.TimeToLive(t.Context(), lease.ID)
		if err != nil || ttl.TTL <= 0 {
			t.Fatalf("lease TTL %v, %v; want it kept alive", ttl, err)
		}
		time.Sleep(200 * time.Millisecond) // pacing the observer, not synchronising
	}
	if _, err := cli.Revoke(t.Context(), lease.ID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a revoked lease was not noticed")
	}
}

// TestNodeLease: the node's session is shared until it is lost, a lost
// one is replaced by a new lease, and Close revokes the lease, so that
// every key under it (slots, the status record) goes at once; nothing is
// granted after Close.
func TestNodeLease(t *testing.T) {
	cli := testNS(t)
	ctx := t.Context()
	l := NewNodeLease(cli, testTTL, 5*time.Second)
	s1, err := l.Current(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := l.Current(ctx); err != nil || again != s1 {
		t.Fatalf("second current = %v, %v; want the same session", again, err)
	}
	// The lease goes (revoked here, as it expires after a partition).
	if _, err := cli.Revoke(ctx, s1.Lease()); err != nil {
		t.Fatal(err)
	}
	l.Drop(s1)
	s2, err := l.Current(ctx)
	if err != nil || s2 == s1 || s2.Lease() == s1.Lease() {
		t.Fatalf("current after the loss = %v, %v; want a new lease", s2, err)
	}
	if _, err := cli.Put(ctx, "/held", "x", clientv3.WithLease(s2.Lease())); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	if resp, err := cli.Get(ctx, "/held"); err != nil || len(resp.Kvs) != 0 {
		t.Errorf("key under the lease after Close: %v, %v; want it gone at once", resp, err)
	}
	if s, err := l.Current(ctx); err == nil {
		t.Errorf("current after Close = lease %x; want an error", s.Lease())
	}

	// A lease that expired meanwhile (a partition): Close has nothing to
	// revoke and says nothing.
	l2 := NewNodeLease(cli, testTTL, 5*time.Second)
	s3, err := l2.Current(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Revoke(ctx, s3.Lease()); err != nil {
		t.Fatal(err)
	}
	if err := l2.Close(); err != nil {
		t.Errorf("Close of an expired lease = %v; want nil", err)
	}
}

// stuckEtcd grants leases but never answers a revoke: etcd unreachable at
// the stop.
type stuckEtcd struct{ fakeLeases }

func (*stuckEtcd) Grant(context.Context, int64) (*clientv3.LeaseGrantResponse, error) {
	return &clientv3.LeaseGrantResponse{ID: 7, TTL: testTTL}, nil
}

func (*stuckEtcd) Revoke(ctx context.Context, _ clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestNodeLeaseCloseEtcdDown: with etcd unreachable, Close gives up after
// revokeWait (the lease then expires by itself) and says so.
func TestNodeLeaseCloseEtcdDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewNodeLease(&stuckEtcd{}, testTTL, time.Second)
		s, err := l.Current(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		err = l.Close()
		if took := time.Since(start); err == nil || took != l.revokeWait {
			t.Errorf("Close = %v after %v; want an error after revokeWait %v", err, took, l.revokeWait)
		}
		if !lost(s) {
			t.Error("keepalives still running after Close")
		}
	})
}
