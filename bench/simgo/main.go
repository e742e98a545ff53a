// Command simgo simulates a fleet of Envoys for bench/convergence.py: N SotW ADS streams in one
// process, each on its own gRPC connection, subscribing the way Envoy does:
//
//   - the first request carries the node (id, cluster = --fleet) and subscribes CDS by wildcard;
//   - after every CDS response: ACK, then subscribe EDS to the cluster names received;
//   - once the first EDS response arrived (initial clusters warmed): subscribe LDS by wildcard;
//   - after every LDS response: ACK, then subscribe RDS to the route_config_name of each listener's
//     HttpConnectionManager;
//   - ACK every EDS and RDS response (its version and nonce, the current subscription).
//
// Only CDS and LDS payloads are decoded (for the names), once per version and process.
//
// For each stream it records when the RouteConfiguration version it holds changed: the
// CLOCK_MONOTONIC time (the clock of Python's time.monotonic on Linux) just after the ACK of a
// response with a new version was handed to gRPC. The driver reads them over HTTP:
//
//	GET /state                       streams, connected, errors, responses and bytes per type,
//	                                 and per RDS version: how many streams hold it, and the first
//	                                 and last time one of them took it (seconds)
//	GET /wait?not=V&timeout=S        blocks until every one of the N streams holds the same RDS
//	                                 version, other than V; answers that version and its times
//	                                 (HTTP 504 after the timeout)
//	GET /cpu                         this process's CPU seconds (user + system)
//
// Built by bench/peers/build.sh, never by the tests or CI.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

const (
	cdsType = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	edsType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	ldsType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	rdsType = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	hcmType = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

func monotonic() float64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

// versionHolders: per RDS version, how many streams hold it and when they took it.
type versionHolders struct {
	count       int
	first, last float64
}

type fleet struct {
	n int

	mu        sync.Mutex
	changed   *sync.Cond
	holders   map[string]*versionHolders
	errors    map[string]int
	responses map[string]int64
	bytes     map[string]int64
	connected int

	names sync.Map // "<type>|<version>" -> []string: dependent names of a CDS or LDS version
}

func newFleet(n int) *fleet {
	f := &fleet{n: n, holders: map[string]*versionHolders{}, errors: map[string]int{},
		responses: map[string]int64{}, bytes: map[string]int64{}}
	f.changed = sync.NewCond(&f.mu)
	return f
}

// took records that a stream moved from RDS version old ("" for none) to version v at time at.
func (f *fleet) took(old, v string, at float64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if h := f.holders[old]; old != "" && h != nil {
		h.count--
		if h.count == 0 {
			delete(f.holders, old)
		}
	}
	h := f.holders[v]
	if h == nil {
		h = &versionHolders{first: at}
		f.holders[v] = h
	}
	h.count++
	h.last = at
	if h.count == f.n {
		f.changed.Broadcast()
	}
}

func (f *fleet) received(typeURL string, size int) {
	f.mu.Lock()
	f.responses[typeURL]++
	f.bytes[typeURL] += int64(size)
	f.mu.Unlock()
}

func (f *fleet) failed(reason string) {
	f.mu.Lock()
	f.errors[reason]++
	f.changed.Broadcast()
	f.mu.Unlock()
}

func (f *fleet) dependentNames(resp *discovery.DiscoveryResponse) ([]string, error) {
	key := resp.TypeUrl + "|" + resp.VersionInfo
	if v, ok := f.names.Load(key); ok {
		return v.([]string), nil
	}
	found := map[string]bool{}
	for _, res := range resp.Resources {
		switch resp.TypeUrl {
		case cdsType:
			var c cluster.Cluster
			if err := proto.Unmarshal(res.Value, &c); err != nil {
				return nil, err
			}
			found[c.Name] = true
		case ldsType:
			var l listener.Listener
			if err := proto.Unmarshal(res.Value, &l); err != nil {
				return nil, err
			}
			for _, chain := range l.FilterChains {
				for _, filter := range chain.Filters {
					if tc := filter.GetTypedConfig(); tc != nil && tc.TypeUrl == hcmType {
						var m hcm.HttpConnectionManager
						if err := proto.Unmarshal(tc.Value, &m); err != nil {
							return nil, err
						}
						if rds := m.GetRds(); rds != nil {
							found[rds.RouteConfigName] = true
						}
					}
				}
			}
		}
	}
	names := make([]string, 0, len(found))
	for name := range found {
		names = append(names, name)
	}
	sort.Strings(names)
	f.names.Store(key, names)
	return names, nil
}

// proxy runs one simulated Envoy until ctx ends or its stream fails.
func (f *fleet) proxy(ctx context.Context, target, nodeID, fleetName string) {
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)),
		// Fixed flow-control windows switch off grpc-go's BDP estimation and its PINGs, which
		// Envoy's HTTP/2 client does not send either (as in simclient.py).
		grpc.WithInitialWindowSize(16<<20), grpc.WithInitialConnWindowSize(16<<20))
	if err != nil {
		f.failed("dial: " + err.Error())
		return
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		f.failed("stream: " + err.Error())
		return
	}
	send := func(req *discovery.DiscoveryRequest) error { return stream.Send(req) }
	if err := send(&discovery.DiscoveryRequest{TypeUrl: cdsType, Node: &core.Node{Id: nodeID, Cluster: fleetName}}); err != nil {
		f.failed("send: " + err.Error())
		return
	}
	names := map[string][]string{}
	versions := map[string]string{}
	nonces := map[string]string{}
	connected, ldsRequested := false, false
	rdsVersion := ""
	defer func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if connected {
			f.connected--
		}
		if h := f.holders[rdsVersion]; rdsVersion != "" && h != nil { // a closed stream holds nothing
			h.count--
			if h.count == 0 {
				delete(f.holders, rdsVersion)
			}
		}
	}()
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() == nil {
				f.failed("recv: " + err.Error())
			}
			return
		}
		if !connected {
			connected = true
			f.mu.Lock()
			f.connected++
			f.mu.Unlock()
		}
		t := resp.TypeUrl
		f.received(t, proto.Size(resp))
		nonces[t], versions[t] = resp.Nonce, resp.VersionInfo
		if err := send(&discovery.DiscoveryRequest{TypeUrl: t, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce, ResourceNames: names[t]}); err != nil {
			f.failed("send: " + err.Error())
			return
		}
		if t == rdsType && resp.VersionInfo != rdsVersion {
			f.took(rdsVersion, resp.VersionInfo, monotonic())
			rdsVersion = resp.VersionInfo
		}
		if !ldsRequested && (t == edsType || (t == cdsType && len(resp.Resources) == 0)) {
			ldsRequested = true
			if err := send(&discovery.DiscoveryRequest{TypeUrl: ldsType}); err != nil {
				f.failed("send: " + err.Error())
				return
			}
		}
		var dependent string
		switch t {
		case cdsType:
			dependent = edsType
		case ldsType:
			dependent = rdsType
		default:
			continue
		}
		wanted, err := f.dependentNames(resp)
		if err != nil {
			f.failed("decode: " + err.Error())
			return
		}
		names[dependent] = wanted
		if err := send(&discovery.DiscoveryRequest{TypeUrl: dependent, VersionInfo: versions[dependent], ResponseNonce: nonces[dependent], ResourceNames: wanted}); err != nil {
			f.failed("send: " + err.Error())
			return
		}
	}
}

func cpuSeconds() float64 {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func (f *fleet) state() map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	rds := map[string]any{}
	for v, h := range f.holders {
		rds[v] = map[string]any{"count": h.count, "first": h.first, "last": h.last}
	}
	return map[string]any{"streams": f.n, "connected": f.connected, "errors": f.errors, "responses": f.responses,
		"bytes": f.bytes, "rds": rds, "cpu_seconds": cpuSeconds()}
}

// wait blocks until all n streams hold one RDS version other than not, or the timeout.
func (f *fleet) wait(not string, timeout time.Duration) (map[string]any, bool) {
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() { f.mu.Lock(); f.changed.Broadcast(); f.mu.Unlock() })
	defer timer.Stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		for v, h := range f.holders {
			if v != not && h.count == f.n {
				return map[string]any{"version": v, "first": h.first, "last": h.last}, true
			}
		}
		if !time.Now().Before(deadline) {
			return nil, false
		}
		f.changed.Wait()
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func main() {
	target := flag.String("target", "127.0.0.1:18000", "ADS server address")
	count := flag.Int("count", 1000, "simulated proxies (streams, one connection each)")
	prefix := flag.String("prefix", "sim-", "node id prefix")
	fleetName := flag.String("fleet", "default", "node.cluster")
	listen := flag.String("listen", "127.0.0.1:0", "HTTP address for /state, /wait, /cpu")
	portFile := flag.String("port-file", "", "write the HTTP port here once listening")
	flag.Parse()

	f := newFleet(*count)
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/state", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, f.state()) })
	mux.HandleFunc("/cpu", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, 200, map[string]float64{"cpu_seconds": cpuSeconds()})
	})
	mux.HandleFunc("/wait", func(w http.ResponseWriter, r *http.Request) {
		timeout, err := strconv.ParseFloat(r.URL.Query().Get("timeout"), 64)
		if err != nil || timeout <= 0 {
			writeJSON(w, 400, map[string]string{"error": "timeout must be a positive number of seconds"})
			return
		}
		if got, ok := f.wait(r.URL.Query().Get("not"), time.Duration(timeout*float64(time.Second))); ok {
			writeJSON(w, 200, got)
		} else {
			writeJSON(w, 504, map[string]any{"error": "timed out", "state": f.state()})
		}
	})
	go func() { _ = http.Serve(lis, mux) }()
	if *portFile != "" {
		port := lis.Addr().(*net.TCPAddr).Port
		// Written aside and renamed, so that the driver never reads a partial number.
		if err := os.WriteFile(*portFile+".tmp", []byte(fmt.Sprint(port)), 0o644); err != nil {
			log.Fatal(err)
		}
		if err := os.Rename(*portFile+".tmp", *portFile); err != nil {
			log.Fatal(err)
		}
	}

	var wg sync.WaitGroup
	for i := 0; i < *count; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			f.proxy(ctx, *target, fmt.Sprintf("%s%d", *prefix, i), *fleetName)
		}(i)
	}
	<-ctx.Done()
	wg.Wait()
}
