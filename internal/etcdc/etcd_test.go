package etcdc

import (
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/die-net/deployer/internal/testetcd"
)

// testTTL is the lease TTL of the tests, in seconds (the daemon's
// sessionTTL).
const testTTL = 10

// testEtcd returns a client of an embedded etcd of the test's own, closed
// at its end.
func testEtcd(tb testing.TB) *clientv3.Client {
	tb.Helper()
	e, url := testetcd.Start(tb, tb.TempDir())
	tb.Cleanup(e.Close)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(), DialOptions: DialOptions()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cli.Close() })
	return cli
}

// testNS returns a client of testEtcd confined to a prefix (InPrefix), as
// the daemon confines its components to -etcd_prefix.
func testNS(tb testing.TB) *clientv3.Client {
	tb.Helper()
	return InPrefix(testEtcd(tb), "/t/"+strings.NewReplacer("/", "-", " ", "-").Replace(tb.Name()))
}
