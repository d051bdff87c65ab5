package etcdc

// lease.go: etcd leases kept alive on a timer of our own: a Session keeps
// one lease alive (the node name's, in the daemon's nodeid.go), and
// NodeLease is the node's current session, shared by the rollout slots and
// the status record, granted again after it is lost.
//
// clientv3's KeepAlive (which concurrency.Session uses) starts two loops in
// the client's lessor that wake every 500 ms for as long as the client
// lives, even after the last lease is gone: an idle node would never
// sleep. A session here refreshes its lease with one LeaseKeepAlive call
// every third of its TTL instead, and says it is lost, like
// concurrency.Session, when etcd reports the lease gone or when no refresh
// has succeeded for a whole TTL.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// leaseAPI is the part of the etcd client a session uses.
type leaseAPI interface {
	// KeepAliveOnce refreshes a lease once.
	KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error)
	// Revoke ends a lease and deletes its keys.
	Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error)
}

// Session keeps one granted lease alive until it is lost, orphaned or
// closed.
type Session struct {
	cli    leaseAPI
	id     clientv3.LeaseID
	ttl    time.Duration
	life   context.Context // the revoke at Close is bounded by it
	ctx    context.Context // the keepalives'; a child of life, cancelled by Orphan
	cancel context.CancelFunc
	done   chan struct{} // closed when the keepalives stop
	once   sync.Once
}

// NewSession returns the session of lease id (granted with ttl seconds),
// to be kept alive until life ends or it is orphaned or closed. It starts
// nothing: Start does.
func NewSession(life context.Context, cli leaseAPI, id clientv3.LeaseID, ttl int) *Session {
	ctx, cancel := context.WithCancel(life)
	return &Session{cli: cli, id: id, ttl: time.Duration(ttl) * time.Second, life: life, ctx: ctx, cancel: cancel, done: make(chan struct{})}
}

// Start begins the keepalives; Orphan and Close stop them and wait for
// them. It returns s.
func (s *Session) Start() *Session {
	go s.keep(s.ctx, time.Now())
	return s
}

// Lease is the session's lease.
func (s *Session) Lease() clientv3.LeaseID { return s.id }

// Done is closed when the lease is lost or no longer kept alive.
func (s *Session) Done() <-chan struct{} { return s.done }

// Orphan stops the keepalives: the lease expires within its TTL.
func (s *Session) Orphan() {
	s.cancel()
	<-s.done
}

// Close stops the keepalives and revokes the lease (its keys go at once),
// within the TTL and while the session's life lasts: a revoke outlives the
// caller's context on purpose, as concurrency.Session's does.
//
//nolint:contextcheck // bounded by the session's life and its TTL, not by the caller
func (s *Session) Close() error {
	s.Orphan()
	ctx, cancel := context.WithTimeout(s.life, s.ttl)
	defer cancel()
	_, err := s.cli.Revoke(ctx, s.id)
	return err
}

// keep refreshes the lease every ttl/3 until ctx ends, etcd says the
// lease is gone, or a whole TTL has passed since the last refresh (the
// lease may have expired: the same rule as clientv3's). A failed refresh
// is tried again within a second.
func (s *Session) keep(ctx context.Context, last time.Time) {
	defer s.once.Do(func() { close(s.done) })
	every := s.ttl / 3
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if time.Since(last) >= s.ttl {
			return // not refreshed for a whole TTL (etcd unreachable, or this process was paused)
		}
		kctx, cancel := context.WithTimeout(ctx, min(every, time.Second))
		_, err := s.cli.KeepAliveOnce(kctx, s.id)
		cancel()
		switch {
		case err == nil:
			last = time.Now()
			t.Reset(every)
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return
		default:
			t.Reset(min(every, time.Second))
		}
	}
}

// leaseGranter is the part of the etcd client a NodeLease uses.
type leaseGranter interface {
	leaseAPI
	// Grant makes a lease of ttl seconds.
	Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error)
}

// NodeLease is the node's current session: the lease under which it holds
// its rollout slots and its status record (the daemon's rollout.go and
// status.go). It is
// granted when first needed, again after it was lost, and revoked by
// Close.
type NodeLease struct {
	cli         leaseGranter
	ttl         int // seconds
	callTimeout time.Duration
	revokeWait  time.Duration // how long Close tries to revoke

	mu      sync.Mutex
	session *Session
	life    context.Context // the keepalives'; ends at Close
	cancel  context.CancelFunc
}

// NewNodeLease returns the node's session source, with leases of ttl
// seconds. It grants nothing until asked.
func NewNodeLease(cli leaseGranter, ttl int, callTimeout time.Duration) *NodeLease {
	life, cancel := context.WithCancel(context.Background())
	return &NodeLease{cli: cli, ttl: ttl, callTimeout: callTimeout, revokeWait: 3 * time.Second, life: life, cancel: cancel}
}

// Current returns the live session, granting a new lease if there is none
// or the last one was lost. The grant is bounded by ctx; the keepalives
// run until Close.
func (l *NodeLease) Current(ctx context.Context) (*Session, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.session != nil {
		select {
		case <-l.session.Done():
			l.session = nil
		default:
			return l.session, nil
		}
	}
	if l.life.Err() != nil {
		return nil, errors.New("the node's etcd session is closed")
	}
	gctx, cancel := context.WithTimeout(ctx, l.callTimeout)
	lease, err := l.cli.Grant(gctx, int64(l.ttl))
	cancel()
	if err != nil {
		return nil, fmt.Errorf("grant lease: %w", err)
	}
	// The keepalives live until Close, not as long as the call.
	l.session = NewSession(l.life, l.cli, lease.ID, l.ttl).Start() //nolint:contextcheck // see above
	return l.session, nil
}

// Held returns the live session, or nil if there is none; it grants
// nothing.
func (l *NodeLease) Held() *Session {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.session
}

// Drop forgets a session whose lease is gone, so that the next caller
// gets a new one.
func (l *NodeLease) Drop(s *Session) {
	l.forget(s)
	s.Orphan()
}

// End gives up a session whose keys could not be deleted: its keepalives
// stop at once, so the lease (and every key under it) expires within its
// TTL even if the revoke cannot reach etcd.
func (l *NodeLease) End(s *Session) {
	l.forget(s)
	_ = s.Close() // orphans, then revokes within the TTL
}

func (l *NodeLease) forget(s *Session) {
	l.mu.Lock()
	if l.session == s {
		l.session = nil
	}
	l.mu.Unlock()
}

// Close revokes the current lease, so that the node's slots and status
// record go at once; nothing is granted after it. With etcd unreachable it
// gives up after revokeWait: the lease then expires by itself within its
// TTL. A lease already gone (expired during a partition) is no error.
//
//nolint:contextcheck // at the stop: bounded by revokeWait, not by a caller
func (l *NodeLease) Close() error {
	l.mu.Lock()
	s := l.session
	l.session = nil
	l.cancel() // under mu: current grants nothing from now on
	l.mu.Unlock()
	if s == nil {
		return nil
	}
	s.Orphan()
	ctx, cancel := context.WithTimeout(context.Background(), l.revokeWait)
	defer cancel()
	if _, err := l.cli.Revoke(ctx, s.Lease()); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("revoke the node's lease (it expires within %ds): %w", l.ttl, err)
	}
	return nil
}
