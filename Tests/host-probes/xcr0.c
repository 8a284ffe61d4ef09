// Probe: can the hardware refuse AVX to guest user code on this PVM host?
// mode 0: plain CPL3 start (CR4 without OSXSAVE), no XCR set
// mode 1: VMM sets CR4.OSXSAVE and XCR0=3 (x87|SSE) via KVM_SET_XCRS, guest starts at CPL3
// mode 2: guest starts at CPL0 (emulated), sets CR4.OSXSAVE itself, xsetbv(0,3), iretq to CPL3
// At CPL3 the guest: xgetbv(0) -> out 0x80 (eax); rdpkru -> out 0x82; vpxor ymm0 -> out 0x81.
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#define MEMSZ (64ul<<20)
static inline uint32_t rdpkru_host(void){uint32_t a,d; __asm__ volatile(".byte 0x0f,0x01,0xee":"=a"(a),"=d"(d):"c"(0)); return a;}
int main(int argc,char**argv){
  int mode=argc>1?atoi(argv[1]):0;
  int kvm=open("/dev/kvm",O_RDWR|O_CLOEXEC); int vm=ioctl(kvm,KVM_CREATE_VM,0);
  ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
  uint8_t*mem=mmap(NULL,MEMSZ,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=MEMSZ,.userspace_addr=(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0x00af9b000000ffffull; gdt[2]=0x00cf93000000ffffull; gdt[3]=0x008f8b000000ffffull;
  gdt[4]=0x00cff3000000ffffull; gdt[5]=0x00affb000000ffffull;
  uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
  pml4[0]=0xa000|7; pdpt[0]=0xb000|7;
  for(int i=0;i<32;i++){ pd[i]=(i<<21)|0x87; }
  int vcpu=ioctl(vm,KVM_CREATE_VCPU,0);
  struct kvm_run*run=mmap(NULL,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100};
  ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp); ioctl(vcpu,KVM_SET_CPUID2,&cp);
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  struct kvm_segment cs={.base=0,.limit=0xfffff,.selector=8,.type=11,.present=1,.s=1,.l=1,.g=1};
  struct kvm_segment ds={.base=0,.limit=0xfffff,.selector=0x10,.type=3,.present=1,.db=1,.s=1,.g=1};
  struct kvm_segment tr={.base=0,.limit=0xfffff,.selector=0x18,.type=11,.present=1,.g=1};
  if(mode!=2){cs.selector=0x2b;cs.dpl=3;ds.selector=0x23;ds.dpl=3;}
  s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.tr=tr; s.gdt.base=0x500; s.gdt.limit=47;
  s.cr0=0x80000033; s.cr3=0x9000; s.cr4=0x20|0x600; s.efer=0x500;
  if(mode==1) s.cr4|=1<<18;
  if(ioctl(vcpu,KVM_SET_SREGS,&s)<0)perror("sregs");
  if(mode==1){ struct kvm_xcrs x={0}; x.nr_xcrs=1; x.xcrs[0].xcr=0; x.xcrs[0].value=3; if(ioctl(vcpu,KVM_SET_XCRS,&x)<0) perror("set xcrs"); }
  // user code at 0x3000
  uint8_t user[]={
    0x31,0xc9,                 // xor ecx,ecx
    0x0f,0x01,0xd0,            // xgetbv
    0xe7,0x80,                 // out 0x80,eax
    0x31,0xc9,                 // xor ecx,ecx
    0x0f,0x01,0xee,            // rdpkru
    0xe7,0x82,                 // out 0x82,eax
    0xc5,0xfd,0xef,0xc0,       // vpxor ymm0,ymm0,ymm0
    0xe7,0x81,                 // out 0x81,eax
    0xf4 };
  memcpy(mem+0x3000,user,sizeof user);
  // kernel code at 0x2000 for mode 2: set OSXSAVE, xsetbv(0,3), iretq to 0x2b:0x3000
  uint8_t kern[]={
    0x0f,0x20,0xe0,                    // mov rax,cr4
    0x48,0x0d,0x00,0x00,0x04,0x00,     // or rax,0x40000
    0x0f,0x22,0xe0,                    // mov cr4,rax
    0x31,0xc9, 0x31,0xd2,              // xor ecx,ecx; xor edx,edx
    0xb8,0x03,0,0,0,                   // mov eax,3
    0x0f,0x01,0xd1,                    // xsetbv
    0xe6,0x90,                         // out 0x90,al  (marker: xsetbv done)
    0x6a,0x23,                         // push 0x23 (ss)
    0x68,0x00,0x80,0,0,                // push 0x8000 (rsp)
    0x68,0x02,0x02,0,0,                // push 0x202 (rflags)
    0x6a,0x2b,                         // push 0x2b (cs)
    0x68,0x00,0x30,0,0,                // push 0x3000
    0x48,0xcf };                       // iretq
  memcpy(mem+0x2000,kern,sizeof kern);
  struct kvm_regs g={0}; g.rip=mode==2?0x2000:0x3000; g.rsp=mode==2?0x7000:0x8000; g.rflags=2; ioctl(vcpu,KVM_SET_REGS,&g);
  uint32_t before=rdpkru_host();
  for(int i=0;i<10;i++){ if(ioctl(vcpu,KVM_RUN,0)<0){perror("run");break;}
    uint32_t after=rdpkru_host();
    if(run->exit_reason==KVM_EXIT_IO){uint32_t v=*(uint32_t*)((uint8_t*)run+run->io.data_offset);
      printf("mode %d: out 0x%x value 0x%x (host pkru %x->%x)\n",mode,run->io.port,v,before,after); if(run->io.port==0x81) break; continue;}
    if(run->exit_reason==KVM_EXIT_SHUTDOWN){struct kvm_regs rr; ioctl(vcpu,KVM_GET_REGS,&rr); printf("mode %d: shutdown (triple fault) at rip 0x%llx\n",mode,rr.rip);break;}
    if(run->exit_reason==KVM_EXIT_INTERNAL_ERROR){printf("mode %d: internal error suberror %d\n",mode,run->internal.suberror);break;}
    if(run->exit_reason==KVM_EXIT_HLT){printf("mode %d: hlt\n",mode);break;}
    printf("mode %d: exit %d\n",mode,run->exit_reason);break;}
  struct kvm_xcrs x={0}; ioctl(vcpu,KVM_GET_XCRS,&x); printf("mode %d: KVM_GET_XCRS n=%u xcr0=0x%llx\n",mode,x.nr_xcrs,(unsigned long long)x.xcrs[0].value);
}
