// spiffe-go-client: a workload written against go-spiffe v2 (the reference Go client),
// unchanged. It finds the agent through SPIFFE_ENDPOINT_SOCKET like any workload and prints
// what it saw as JSON lines on stdout; on failure it prints {"error": ..., "stage": ...}
// with go-spiffe's own error text and exits 1, so a test can say what go-spiffe saw.
//
//	x509 [-rotations N]            X509Source: SVID + bundle now, then each new SVID pushed
//	                               on the open stream (Updated() channel), N times
//	jwt -audience A -other B       JWTSource: FetchJWTSVID, ValidateJWTSVID through the agent,
//	                               jwtsvid.ParseAndValidate locally with the JWT bundle; the
//	                               token must be refused for audience B and when tampered with
//	serve -allow ID [-conns N]     spiffetls.Listen on 127.0.0.1, authorising clients by ID
//	dial -addr A -expect ID        spiffetls.Dial, authorising the server by ID
//	bench -method x509|jwt ...     latency of N concurrent callers (used by the benchmarks)
//	first-fetch [-interval D]      fetch an X.509-SVID until one arrives; print when
//	version                        the Go and go-spiffe versions it was built with
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func emit(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(b))
}

// fail reports what go-spiffe returned, on stdout (for the test's parser) and stderr.
func fail(stage string, err error) {
	emit(map[string]string{"stage": stage, "error": err.Error()})
	fmt.Fprintf(os.Stderr, "spiffe-go-client: %s: %v\n", stage, err)
	os.Exit(1)
}

// streamLog records what the Workload API client logs: an error means the watch stream
// broke and was re-opened, so an update after one was not delivered on the open stream.
type streamLog struct {
	mu     sync.Mutex
	errors []string
}

func (l *streamLog) Debugf(string, ...any) {}
func (l *streamLog) Infof(string, ...any)  {}
func (l *streamLog) Warnf(format string, args ...any) {
	l.Errorf(format, args...)
}
func (l *streamLog) Errorf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errors = append(l.errors, fmt.Sprintf(format, args...))
}
func (l *streamLog) snapshot() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string{}, l.errors...)
}

func x509Cmd(args []string) {
	fs := flag.NewFlagSet("x509", flag.ExitOnError)
	rotations := fs.Int("rotations", 0, "new SVIDs to wait for on the open stream")
	timeout := fs.Duration("timeout", 60*time.Second, "overall deadline")
	_ = fs.Parse(args)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	log := &streamLog{}
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithLogger(log)))
	if err != nil {
		fail("NewX509Source", fmt.Errorf("%w (client log: %v)", err, log.snapshot()))
	}
	defer source.Close()

	updates := 0
	report := func() string {
		svid, err := source.GetX509SVID()
		if err != nil {
			fail("GetX509SVID", err)
		}
		bundle, err := source.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
		if err != nil {
			fail("GetX509BundleForTrustDomain", err)
		}
		// The chain must verify against the bundle the same source delivered.
		verified, _, err := x509svid.Verify(svid.Certificates, source)
		if err != nil {
			fail("x509svid.Verify", err)
		}
		serial := svid.Certificates[0].SerialNumber.Text(16)
		emit(map[string]any{
			"spiffe_id":     svid.ID.String(),
			"serial":        serial,
			"not_after":     svid.Certificates[0].NotAfter.Unix(),
			"chain":         len(svid.Certificates),
			"roots":         len(bundle.X509Authorities()),
			"verified":      verified.String(),
			"updates":       updates,
			"stream_errors": log.snapshot(),
		})
		return serial
	}
	last := report()
	for seen := 0; seen < *rotations; {
		select {
		case <-source.Updated():
			updates++
			svid, err := source.GetX509SVID()
			if err != nil {
				fail("GetX509SVID", err)
			}
			// Other updates (a bundle change) are counted but not reported as rotations.
			if svid.Certificates[0].SerialNumber.Text(16) != last {
				last = report()
				seen++
			}
		case <-ctx.Done():
			fail("waiting for a rotation", fmt.Errorf("%w after %d updates (client log: %v)", ctx.Err(), updates, log.snapshot()))
		}
	}
}

func jwtCmd(args []string) {
	fs := flag.NewFlagSet("jwt", flag.ExitOnError)
	audience := fs.String("audience", "", "audience to request")
	other := fs.String("other", "someone-else", "an audience the token must not be valid for")
	timeout := fs.Duration("timeout", 30*time.Second, "overall deadline")
	_ = fs.Parse(args)
	if *audience == "" {
		fail("arguments", errors.New("-audience is required"))
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	source, err := workloadapi.NewJWTSource(ctx)
	if err != nil {
		fail("NewJWTSource", err)
	}
	defer source.Close()
	svid, err := source.FetchJWTSVID(ctx, jwtsvid.Params{Audience: *audience})
	if err != nil {
		fail("FetchJWTSVID", err)
	}
	token := svid.Marshal()
	viaAgent, err := workloadapi.ValidateJWTSVID(ctx, token, *audience)
	if err != nil {
		fail("ValidateJWTSVID", err)
	}
	local, err := jwtsvid.ParseAndValidate(token, source, []string{*audience})
	if err != nil {
		fail("jwtsvid.ParseAndValidate", err)
	}
	errText := func(err error) string {
		if err == nil {
			return ""
		}
		return err.Error()
	}
	_, agentOther := workloadapi.ValidateJWTSVID(ctx, token, *other)
	_, localOther := jwtsvid.ParseAndValidate(token, source, []string{*other})
	// Flip one character of the signature: the bundle's key must refuse it.
	parts := strings.Split(token, ".")
	sig := []byte(parts[2])
	if sig[0] == 'A' {
		sig[0] = 'B'
	} else {
		sig[0] = 'A'
	}
	tampered := parts[0] + "." + parts[1] + "." + string(sig)
	_, localTampered := jwtsvid.ParseAndValidate(tampered, source, []string{*audience})
	emit(map[string]any{
		"spiffe_id":               svid.ID.String(),
		"audience":                svid.Audience,
		"expiry":                  svid.Expiry.Unix(),
		"validated":               viaAgent.ID.String(),
		"local":                   local.ID.String(),
		"agent_other_audience":    errText(agentOther),
		"local_other_audience":    errText(localOther),
		"local_tampered":          errText(localTampered),
		"validated_audience":      viaAgent.Audience,
		"local_validated_subject": local.ID.String(),
	})
}

func serveCmd(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	allow := fs.String("allow", "", "SPIFFE ID of the only client allowed")
	conns := fs.Int("conns", 1, "connections to serve before exiting")
	timeout := fs.Duration("timeout", 60*time.Second, "overall deadline")
	_ = fs.Parse(args)
	id, err := spiffeid.FromString(*allow)
	if err != nil {
		fail("arguments", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	listener, err := spiffetls.Listen(ctx, "tcp", "127.0.0.1:0", tlsconfig.AuthorizeID(id))
	if err != nil {
		fail("spiffetls.Listen", err)
	}
	defer listener.Close()
	emit(map[string]string{"listening": listener.Addr().String()})
	for i := 0; i < *conns; i++ {
		conn, err := listener.Accept()
		if err != nil {
			fail("Accept", err)
		}
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			// The handshake runs on first read: this is where an unauthorised client shows.
			emit(map[string]string{"conn_error": err.Error()})
			conn.Close()
			continue
		}
		peer, err := spiffetls.PeerIDFromConn(conn)
		if err != nil {
			fail("PeerIDFromConn", err)
		}
		_, err = fmt.Fprintf(conn, "hello %s, you said %s", peer, line)
		if err != nil {
			emit(map[string]string{"conn_error": err.Error()})
		} else {
			emit(map[string]string{"peer": peer.String(), "said": strings.TrimSpace(line)})
		}
		conn.Close()
	}
}

func dialCmd(args []string) {
	fs := flag.NewFlagSet("dial", flag.ExitOnError)
	addr := fs.String("addr", "", "host:port of the server")
	expect := fs.String("expect", "", "SPIFFE ID the server must have")
	timeout := fs.Duration("timeout", 30*time.Second, "overall deadline")
	_ = fs.Parse(args)
	id, err := spiffeid.FromString(*expect)
	if err != nil {
		fail("arguments", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := spiffetls.Dial(ctx, "tcp", *addr, tlsconfig.AuthorizeID(id))
	if err != nil {
		fail("spiffetls.Dial", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintln(conn, "ping"); err != nil {
		fail("write", err)
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil && reply == "" {
		fail("read", err)
	}
	server, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		fail("PeerIDFromConn", err)
	}
	emit(map[string]string{"server": server.String(), "reply": strings.TrimSpace(reply)})
}

// benchCmd: `callers` concurrent workloads, each with its own Workload API client
// (connection), each timing `calls` fetches after one untimed warm-up call.
func benchCmd(args []string) {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	method := fs.String("method", "x509", "x509 (FetchX509SVID, first message of the stream) or jwt (FetchJWTSVID)")
	callers := fs.Int("callers", 1, "concurrent callers")
	calls := fs.Int("calls", 100, "timed calls per caller")
	_ = fs.Parse(args)

	ctx := context.Background()
	clients := make([]*workloadapi.Client, *callers)
	for i := range clients {
		c, err := workloadapi.New(ctx)
		if err != nil {
			fail("workloadapi.New", err)
		}
		defer c.Close()
		clients[i] = c
	}
	call := func(c *workloadapi.Client) error {
		if *method == "x509" {
			_, err := c.FetchX509SVID(ctx)
			return err
		}
		_, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "bench"})
		return err
	}
	for _, c := range clients {
		if err := call(c); err != nil {
			fail("warm-up "+*method, err)
		}
	}
	lat := make([][]float64, *callers)
	var failed atomic.Value
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, c := range clients {
		wg.Add(1)
		go func(i int, c *workloadapi.Client) {
			defer wg.Done()
			<-start
			l := make([]float64, 0, *calls)
			for j := 0; j < *calls; j++ {
				t := time.Now()
				if err := call(c); err != nil {
					failed.Store(err)
					return
				}
				l = append(l, float64(time.Since(t).Nanoseconds())/1e3)
			}
			lat[i] = l
		}(i, c)
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	wall := time.Since(t0).Seconds()
	if err, ok := failed.Load().(error); ok {
		fail(*method, err)
	}
	all := []float64{}
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Float64s(all)
	emit(map[string]any{"latencies_us": all, "wall_s": wall})
}

// firstFetchCmd fetches until an X.509-SVID arrives and prints the wall-clock time it did:
// the bench compares it with the time it started this process (or created the entry).
func firstFetchCmd(args []string) {
	fs := flag.NewFlagSet("first-fetch", flag.ExitOnError)
	interval := fs.Duration("interval", 5*time.Millisecond, "pause between attempts")
	timeout := fs.Duration("timeout", 60*time.Second, "give up after")
	_ = fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client, err := workloadapi.New(ctx)
	if err != nil {
		fail("workloadapi.New", err)
	}
	defer client.Close()
	attempts := 0
	var firstErr string
	var lastErr error
	for ctx.Err() == nil {
		attempts++
		svid, err := client.FetchX509SVID(ctx)
		if err == nil {
			done := time.Now().UnixNano()
			emit(map[string]any{
				"main_unix_ns":    mainStarted.UnixNano(),
				"fetched_unix_ns": done,
				"attempts":        attempts,
				"first_error":     firstErr,
				"spiffe_id":       svid.ID.String(),
				"serial":          svid.Certificates[0].SerialNumber.Text(16),
			})
			return
		}
		if attempts == 1 {
			firstErr = err.Error()
		}
		lastErr = err
		time.Sleep(*interval)
	}
	fail("first-fetch", fmt.Errorf("no SVID after %d attempts: %w", attempts, lastErr))
}

func versionCmd() {
	goSpiffe := "unknown"
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "github.com/spiffe/go-spiffe/v2" {
				goSpiffe = dep.Version
			}
		}
	}
	emit(map[string]string{"go": runtime.Version(), "go_spiffe": goSpiffe})
}

// When main started: what comes before is the loader and the Go runtime, not the agent.
var mainStarted time.Time

func main() {
	mainStarted = time.Now()
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: spiffe-go-client x509|jwt|serve|dial|bench|first-fetch|version [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "x509":
		x509Cmd(os.Args[2:])
	case "jwt":
		jwtCmd(os.Args[2:])
	case "serve":
		serveCmd(os.Args[2:])
	case "dial":
		dialCmd(os.Args[2:])
	case "bench":
		benchCmd(os.Args[2:])
	case "first-fetch":
		firstFetchCmd(os.Args[2:])
	case "version":
		versionCmd()
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}
