package ledger_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	ledger "github.com/quota-ledger/ledger-service/clients/go"
)

// The service the tests run against: started by TestMain, or LEDGER_TEST_URL with LEDGER_TEST_ADMIN_KEY.
var (
	baseURL  string
	adminKey string
	relayKey string
	admin    *ledger.Client
	relay    *ledger.Client
)

// ids: every test takes fresh user, token and channel ids and request ids, so tests are independent of each
// other and of earlier runs against the same service.
var (
	idBase = time.Now().UnixNano() / 1000 % 1_000_000_000_000 * 1000
	idSeq  int64
)

func nextID() int64 { return idBase + atomic.AddInt64(&idSeq, 1) }

func reqID(t testing.TB, name string) string {
	return fmt.Sprintf("go-%d-%d-%s", idBase, atomic.AddInt64(&idSeq, 1), name)
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	stop := func() {}
	if u := os.Getenv("LEDGER_TEST_URL"); u != "" {
		baseURL, adminKey = u, os.Getenv("LEDGER_TEST_ADMIN_KEY")
		if adminKey == "" {
			fmt.Fprintln(os.Stderr, "LEDGER_TEST_URL needs LEDGER_TEST_ADMIN_KEY")
			return 2
		}
	} else {
		var err error
		stop, err = startService()
		if err != nil {
			fmt.Fprintln(os.Stderr, "starting the ledger service:", err)
			return 2
		}
	}
	defer stop()
	// Stop the service on Ctrl-C or SIGTERM as well.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		stop()
		os.Exit(1)
	}()

	admin = ledger.New(baseURL, adminKey)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	k, err := admin.CreateAPIKey(ctx, fmt.Sprintf("go-client-tests-%d", idBase), "relay")
	if err != nil {
		fmt.Fprintln(os.Stderr, "creating a relay key:", err)
		return 2
	}
	relayKey = k.Key
	relay = ledger.New(baseURL, relayKey)
	return m.Run()
}

// startService runs ../../.venv/bin/ledger-service serve on a free loopback port with a temporary data directory
// and admin key, waits for GET /health, and returns the function that stops it (SIGTERM, then wait).
func startService() (func(), error) {
	bin, err := filepath.Abs(filepath.Join("..", "..", ".venv", "bin", "ledger-service"))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("%s is missing: run `make install` in the repository root (%v)", bin, err)
	}
	dir, err := os.MkdirTemp("", "ledger-go-test-")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	adminKey = fmt.Sprintf("go-test-admin-%d", time.Now().UnixNano())
	baseURL = "http://127.0.0.1:" + strconv.Itoa(port)
	logf, err := os.Create(filepath.Join(dir, "service.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "serve", "--host", "127.0.0.1", "--port", strconv.Itoa(port))
	cmd.Env = append(os.Environ(),
		"LEDGER_DATA_DIR="+filepath.Join(dir, "data"),
		"LEDGER_ADMIN_KEY="+adminKey,
		"LEDGER_LOG_FORMAT=text",
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	setDeathSignal(cmd)
	// The death signal is tied to the thread that starts the child: keep TestMain's goroutine on it for good.
	runtime.LockOSThread()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(60 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
			logf.Close()
			if os.Getenv("LEDGER_TEST_KEEP_DATA") == "" {
				_ = os.RemoveAll(dir)
			} else {
				fmt.Fprintln(os.Stderr, "service data and log kept in", dir)
			}
		})
	}
	if err := waitHealthy(exited, 180*time.Second); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "service.log"))
		stop()
		return nil, fmt.Errorf("%v\n--- service log ---\n%s", err, log)
	}
	return stop, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitHealthy polls GET /health until it answers 200, the process exits, or the time is up.
func waitHealthy(exited <-chan struct{}, limit time.Duration) error {
	deadline := time.After(limit)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	hc := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := hc.Get(baseURL + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-exited:
			return errors.New("the service exited before it was ready")
		case <-deadline:
			return fmt.Errorf("the service was not healthy within %s", limit)
		case <-tick.C:
		}
	}
}
