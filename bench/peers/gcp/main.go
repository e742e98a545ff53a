// Command gcp is the go-control-plane peer of bench/convergence.py: an ADS server built the way
// go-control-plane's own examples build one, serving resources that the benchmark driver hands it.
//
// The driver builds the resources with our control plane (it fetches them from a running
// `bluegreen` server over ADS) and posts them, serialized, to this program's HTTP endpoint:
//
//	POST /snapshot  {"types": {"<type_url>": {"version": "v", "resources": ["<base64 Any.value>", ...]}}}
//
// Each listed type replaces that type's resources and version in the current snapshot; types not
// listed keep theirs (a weight change posts only the route configurations). The new snapshot is set
// in one SnapshotCache (SotW, not ADS-ordered) under one key for every node: all proxies share one
// snapshot, and per-type versions mean a route change pushes RDS only. The answer is
// {"handler_seconds": s}, the time from the request body being read to SetSnapshot returning.
//
//	GET /stats      {"streams_open": n, "streams_total": n, "requests": n, "responses": n}
//	GET /healthz    ok
//
// Built by bench/peers/build.sh, never by the tests or CI.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	// Register the resource types, so that anypb.UnmarshalNew knows them.
	_ "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// sharedKey maps every node to one snapshot: the fleet's.
const sharedKey = "fleet"

type oneFleet struct{}

func (oneFleet) ID(*core.Node) string { return sharedKey }

var responseTypes = map[string]cachetypes.ResponseType{
	resourcev3.ClusterType:  cachetypes.Cluster,
	resourcev3.EndpointType: cachetypes.Endpoint,
	resourcev3.ListenerType: cachetypes.Listener,
	resourcev3.RouteType:    cachetypes.Route,
}

type typeUpdate struct {
	Version   string   `json:"version"`
	Resources [][]byte `json:"resources"` // serialized resources (Any.value), base64 in JSON
}

type snapshotRequest struct {
	Types map[string]typeUpdate `json:"types"`
}

type peer struct {
	cache cache.SnapshotCache
	mu    sync.Mutex // serializes snapshot updates
	snap  cache.Snapshot

	streamsOpen, streamsTotal, requests, responses atomic.Int64
}

// update replaces the listed types in the current snapshot and sets it for the fleet.
func (p *peer) update(ctx context.Context, req snapshotRequest) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	next := p.snap // arrays copy by value; untouched types keep their Resources
	for typeURL, update := range req.Types {
		index, ok := responseTypes[typeURL]
		if !ok {
			return fmt.Errorf("unsupported type %q", typeURL)
		}
		items := make([]cachetypes.Resource, 0, len(update.Resources))
		for i, raw := range update.Resources {
			msg, err := anypb.UnmarshalNew(&anypb.Any{TypeUrl: typeURL, Value: raw}, proto.UnmarshalOptions{})
			if err != nil {
				return fmt.Errorf("%s resource %d: %w", typeURL, i, err)
			}
			items = append(items, msg)
		}
		next.Resources[index] = cache.NewResources(update.Version, items)
	}
	if err := p.cache.SetSnapshot(ctx, sharedKey, &next); err != nil {
		return err
	}
	p.snap = next
	return nil
}

func (p *peer) handleSnapshot(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	started := time.Now()
	var req snapshotRequest
	if err := json.Unmarshal(body, &req); err != nil {
		http.Error(w, "bad JSON: "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := p.update(r.Context(), req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	elapsed := time.Since(started).Seconds()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]float64{"handler_seconds": elapsed})
}

func (p *peer) handleStats(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]int64{
		"streams_open": p.streamsOpen.Load(), "streams_total": p.streamsTotal.Load(),
		"requests": p.requests.Load(), "responses": p.responses.Load(),
	})
}

func (p *peer) callbacks() server.Callbacks {
	return server.CallbackFuncs{
		StreamOpenFunc: func(context.Context, int64, string) error {
			p.streamsOpen.Add(1)
			p.streamsTotal.Add(1)
			return nil
		},
		StreamClosedFunc:  func(int64, *core.Node) { p.streamsOpen.Add(-1) },
		StreamRequestFunc: func(int64, *discoverygrpc.DiscoveryRequest) error { p.requests.Add(1); return nil },
		StreamResponseFunc: func(context.Context, int64, *discoverygrpc.DiscoveryRequest, *discoverygrpc.DiscoveryResponse) {
			p.responses.Add(1)
		},
	}
}

func main() {
	xdsAddr := flag.String("xds", "127.0.0.1:18000", "ADS gRPC listen address")
	adminAddr := flag.String("admin", "127.0.0.1:18001", "HTTP listen address (snapshot updates, stats)")
	flag.Parse()

	ctx := context.Background()
	p := &peer{cache: cache.NewSnapshotCache(false, oneFleet{}, nil)}
	if err := p.cache.SetSnapshot(ctx, sharedKey, &p.snap); err != nil {
		log.Fatal(err)
	}
	xds := server.NewServer(ctx, p.cache, p.callbacks())
	// As in go-control-plane's example server: no per-connection stream limit to speak of.
	grpcServer := grpc.NewServer(grpc.MaxConcurrentStreams(1000000))
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(grpcServer, xds)

	lis, err := net.Listen("tcp", *xdsAddr)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/snapshot", p.handleSnapshot)
	mux.HandleFunc("/stats", p.handleStats)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	go func() { log.Fatal(http.ListenAndServe(*adminAddr, mux)) }()
	log.Printf("gcp peer: xds %s, admin %s", *xdsAddr, *adminAddr)
	log.Fatal(grpcServer.Serve(lis))
}
