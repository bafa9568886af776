// The `metrics-adapter` harness tool: upstream's custom metrics test adapter
// (sigs.k8s.io/custom-metrics-apiserver/test-adapter) serving
// custom.metrics.k8s.io for the HorizontalPodAutoscaler, with metric values
// that tests write over HTTP (POST /write-metrics/namespaces/<ns>/pods/<pod>/<metric>).
//
// This is upstream's test-adapter main.go with one change: the address of the
// write endpoint is a flag (upstream hard-codes ":8080" on every interface,
// which would collide between two test planes on one machine). The metrics API
// itself (apiserver, provider, discovery, authn/z) is upstream's code unchanged.
package main

import (
	"context"
	"net/http"
	"os"
	"time"

	"github.com/emicklei/go-restful/v3"
	"k8s.io/component-base/logs"
	"k8s.io/component-base/metrics/legacyregistry"
	"k8s.io/klog/v2"

	"sigs.k8s.io/custom-metrics-apiserver/pkg/apiserver/metrics"
	basecmd "sigs.k8s.io/custom-metrics-apiserver/pkg/cmd"
	"sigs.k8s.io/custom-metrics-apiserver/pkg/provider"
	fakeprov "sigs.k8s.io/custom-metrics-apiserver/test-adapter/provider"
)

type adapter struct {
	basecmd.AdapterBase
	// writeAddress is where tests POST metric values (plain HTTP).
	writeAddress string
}

func (a *adapter) makeProviderOrDie() (provider.MetricsProvider, *restful.WebService) {
	client, err := a.DynamicClient()
	if err != nil {
		klog.Fatalf("unable to construct dynamic client: %v", err)
	}
	mapper, err := a.RESTMapper()
	if err != nil {
		klog.Fatalf("unable to construct discovery REST mapper: %v", err)
	}
	return fakeprov.NewFakeProvider(client, mapper)
}

func main() {
	logs.InitLogs()
	defer logs.FlushLogs()

	cmd := &adapter{}
	cmd.Name = "metrics-adapter"
	cmd.Flags().StringVar(&cmd.writeAddress, "write-metrics-address", "127.0.0.1:8080",
		"host:port of the plain-HTTP endpoint that sets metric values")
	logs.AddFlags(cmd.Flags())
	if err := cmd.Flags().Parse(os.Args); err != nil {
		klog.Fatalf("unable to parse flags: %v", err)
	}

	testProvider, webService := cmd.makeProviderOrDie()
	cmd.WithCustomMetrics(testProvider)
	cmd.WithExternalMetrics(testProvider)
	if err := metrics.RegisterMetrics(legacyregistry.Register); err != nil {
		klog.Fatalf("unable to register metrics: %v", err)
	}

	restful.DefaultContainer.Add(webService)
	go func() {
		server := &http.Server{Addr: cmd.writeAddress, ReadHeaderTimeout: 3 * time.Second}
		klog.Fatal(server.ListenAndServe())
	}()
	if err := cmd.Run(context.Background()); err != nil {
		klog.Fatalf("unable to run custom metrics adapter: %v", err)
	}
}
